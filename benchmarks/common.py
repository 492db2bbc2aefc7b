"""What several benchmarks share: the demo teacher's WikiText-2 trial, so that every evidence script trains its
plans with the same settings and ILKD budget (`search_vs_presets.py`, `families.py`)."""
from __future__ import annotations

from pathlib import Path


def demo_wikitext_trial(data: str, steps: int, lr: float) -> dict:
    """The trial config (without a plan) of the demo teacher distilled on WikiText-2 for `steps` steps: sequences of
    128 tokens, 400k training tokens, 64 validation blocks, ILKD (emb, att, hid 0.5) + 0.1 cross-entropy, data-aware
    init, one thread, no checkpoint."""
    return {
        "teacher": "demo",
        "data": {"source": str(Path(data).resolve()), "seq_len": 128, "max_train_tokens": 400_000, "val_blocks": 64},
        "stage1": {"lr": lr, "warmup_steps": 10, "batch_size": 8, "max_steps": steps,
                   "eval_every": max(steps // 3, 1), "eval_batches": 8, "early_stopping": None,
                   "distill": {"emb": 0.5, "att": 0.5, "hid": 0.5, "ce": 0.1}},
        "init": "data",
        "seed": 0,
        "threads": 1,
        "save_checkpoint": False,
    }
