"""Trials: the data, teachers and training loops that a compression trial runs on.

Modules: `trials.data` (causal-LM text blocks, data-free teacher samples), `trials.glue` (GLUE loaders and
metrics), `trials.teacher` (train / fine-tune small teachers, the bundled demo teacher). Import them directly;
this package imports nothing heavy at import time.
"""
