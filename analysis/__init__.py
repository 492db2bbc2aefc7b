"""Analysis of saved kronsearch results: load trial summaries, Pareto fronts, hypervolume, plots.

Works from the files a search leaves behind only; it never imports Ray, torch or transformers. Import the
submodules directly (`analysis.results`, `analysis.pareto`, `analysis.plots`): this package file stays empty
so that `import analysis` costs nothing.
"""
