"""Search over Kronecker compression plans with Ray Tune + Optuna.

Modules: `search.config` (the YAML search config, validated before any Ray work), `search.space` (the plans of a
space for one teacher: sizes, sampling, analytic costs), `search.tuner` (Ray trainable, multi-objective Optuna
searcher, ASHA, resume), `search.commands` (`kronsearch search ...`). Import them directly: this file imports
nothing, so `import search` never starts Ray or torch.
"""
