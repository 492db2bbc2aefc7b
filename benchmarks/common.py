"""What several benchmarks share: the demo teacher's WikiText-2 trial, so that every evidence script trains its
plans with the same settings and ILKD budget (`search_vs_presets.py`, `families.py`), the pool that runs their
plans, and the perplexity `init_quality.py` and `autoplan.py` measure."""
from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor
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


def perplexity(model, blocks, batch: int = 16) -> float:
    """exp(mean next-token NLL) over token blocks, as trials evaluate it (`trials.evaluate.evaluate_lm`)."""
    from trials.evaluate import evaluate_lm

    return evaluate_lm(model, blocks, batch, next(model.parameters()).device)["quality"]


def _run_trial(cfg: dict, out: str) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from trials.trial import run_trial

    return run_trial(cfg, output_dir=out, progress=False)


def run_trials(todo: dict[str, tuple[dict, Path]]) -> None:
    """Run trial configs (label -> (config with its name, output folder)) two at a time; a trial that fails is
    printed with its label and the others go on."""
    with ProcessPoolExecutor(max_workers=2) as pool:
        futures = {label: pool.submit(_run_trial, cfg, str(out)) for label, (cfg, out) in todo.items()}
        for label, fut in futures.items():
            try:
                fut.result()
            except Exception as exc:  # one failing plan must not hide the others
                print(f"{label}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
