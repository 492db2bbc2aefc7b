"""Search over Kronecker compression plans with Ray Tune + Optuna.

Modules: `search.config` (the YAML search config, validated before any Ray work), `search.space` (the plans of a
space for one teacher: sizes, sampling, analytic costs), `search.tuner` (`run_search`, which puts together
`search.trainable`, `search.searcher`, `search.scheduler`, `search.progress`, `search.raystart`, `search.storage`,
`search.resume`, `search.reference` and `search.finalize`), `search.commands` (`kronsearch search ...`). Import
them directly: this file imports nothing, so `import search` never starts Ray or torch.
"""
