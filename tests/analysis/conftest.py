"""Fixtures that write fake kronsearch result directories (no Ray, no models: just the JSON files).

`make_fake_results(root)` builds a realistic layout: two Ray-Tune-style experiment directories of a 4-layer,
384-wide GPT-2 (15 trials each, some failed) and a folder of reference trials (teacher, preset, low-rank,
layer-drop). Parameter counts follow from the random plans, so plans, params and quality agree.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

SCHEMA = "kronsearch.trial/1"
N_LAYER, D_MODEL, VOCAB, N_POS = 4, 384, 4096, 256
# (module suffix, rows, cols, blocks) of the dense matrices of one GPT-2 block (Conv1D weights are in x out).
BLOCK_MATRICES = (
    ("attn.c_attn", D_MODEL, 3 * D_MODEL, 3),
    ("attn.c_proj", D_MODEL, D_MODEL, 1),
    ("mlp.c_fc", D_MODEL, 4 * D_MODEL, 1),
    ("mlp.c_proj", 4 * D_MODEL, D_MODEL, 1),
)
# Candidate Kronecker shapes (m1, n1, m2, n2) per module suffix, for one block.
CHOICES = {
    "attn.c_attn": ([192, 384, 2, 1], [96, 96, 4, 4], [48, 96, 8, 4]),
    "attn.c_proj": ([192, 384, 2, 1], [96, 96, 4, 4]),
    "mlp.c_fc": ([192, 768, 2, 2], [96, 384, 4, 4], [48, 192, 8, 8]),
    "mlp.c_proj": ([768, 192, 2, 2], [384, 96, 4, 4], [192, 48, 8, 8]),
}
EMBEDDING_PARAMS = VOCAB * D_MODEL + N_POS * D_MODEL
OTHER_PARAMS = N_LAYER * (4 * D_MODEL + 3 * D_MODEL + D_MODEL + 4 * D_MODEL + D_MODEL) + 2 * D_MODEL  # biases, LN
TEACHER_MATRIX_PARAMS = N_LAYER * sum(rows * cols for _, rows, cols, _ in BLOCK_MATRICES)
TEACHER_PARAMS = EMBEDDING_PARAMS + OTHER_PARAMS + TEACHER_MATRIX_PARAMS
TEACHER_PPL = 62.0


def module_names() -> list[str]:
    return [f"transformer.h.{layer}.{suffix}" for layer in range(N_LAYER) for suffix, *_ in BLOCK_MATRICES]


def summary(**overrides) -> dict:
    """A valid complete trial summary for the tiny teacher; `overrides` replace any key."""
    data = {
        "schema": SCHEMA, "trial_id": "t0", "search": None, "method": "kronecker", "label": None,
        "status": "complete", "error": None, "quality_name": "val_ppl", "quality_mode": "min",
        "quality": 100.0, "quality_at_init": 900.0,
        "params": TEACHER_PARAMS // 2, "params_excl_output_embedding": TEACHER_PARAMS // 2 - VOCAB * D_MODEL,
        "params_teacher": TEACHER_PARAMS, "compression_ratio": 2.0,
        "macs_per_token": TEACHER_PARAMS // 2, "macs_per_token_teacher": TEACHER_PARAMS,
        "throughput_tokens_per_s": 12000.0, "wall_time_s": 321.0, "steps": 400, "tokens_seen": 400 * 8 * 256,
        "plan": {"default": "keep"}, "plan_summary": "keep everything",
        "plan_resolved": {name: "keep" for name in module_names()},
        "config": {"lr": 3e-4}, "checkpoint": None,
        "history": [],
    }
    data.update(overrides)
    return data


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def random_plan(rng: np.random.Generator, keep_prob: float) -> tuple[dict, int]:
    """(plan_resolved, matrix params) for a random per-module choice of keep / Kronecker shape."""
    plan, params = {}, 0
    for layer in range(N_LAYER):
        for suffix, rows, cols, blocks in BLOCK_MATRICES:
            name = f"transformer.h.{layer}.{suffix}"
            if rng.random() < keep_prob:
                plan[name] = "keep"
                params += rows * cols
                continue
            m1, n1, m2, n2 = CHOICES[suffix][rng.integers(len(CHOICES[suffix]))]
            rank = int(rng.choice([1, 1, 2]))
            plan[name] = {"shape": [m1, n1, m2, n2], "rank": rank, "blocks": blocks}
            params += blocks * rank * (m1 * n1 + m2 * n2)
    return plan, params


def fake_history(rng: np.random.Generator, final: float, init: float, steps: int) -> list[dict]:
    history = []
    for i, step in enumerate(range(0, steps + 1, max(steps // 5, 1))):
        frac = step / steps
        quality = final + (init - final) * math.exp(-6 * frac)
        loss = math.log(quality)
        history.append({
            "step": step, "tokens_seen": step * 2048, "wall_time_s": 0.8 * step, "quality": quality,
            "loss": loss, "loss_emb": 0.1 * loss, "loss_att": 0.2 * loss, "loss_hid": 0.3 * loss,
            "loss_ce": loss, "loss_logits": 0.5 * loss, "throughput_tokens_per_s": float(rng.normal(12000, 300)),
        })
    return history


def trial(rng: np.random.Generator, trial_id: str, search: str | None, skill: float, status: str = "complete"):
    keep_prob = rng.uniform(0.0, 0.45)
    plan, matrix_params = random_plan(rng, keep_prob)
    params = EMBEDDING_PARAMS + OTHER_PARAMS + matrix_params
    compressed = (params - EMBEDDING_PARAMS) / 1e6
    # Perplexity grows fast as the model shrinks; `skill` shifts a search's curve; a little noise on top.
    ppl = TEACHER_PPL + (12 + 900 * math.exp(-compressed / 1.1)) / skill * math.exp(rng.normal(0, 0.3))
    n_kron = sum(1 for spec in plan.values() if spec != "keep")
    data = summary(
        trial_id=trial_id, search=search, status=status, quality=round(ppl, 2), quality_at_init=round(ppl * 9, 1),
        params=int(params), params_excl_output_embedding=int(params - VOCAB * D_MODEL),
        compression_ratio=TEACHER_PARAMS / params, macs_per_token=int(params - EMBEDDING_PARAMS),
        plan_resolved=plan, plan_summary=f"{n_kron}/{len(plan)} matrices Kronecker",
        checkpoint="checkpoint/model.safetensors",
        history=fake_history(rng, ppl, ppl * 9, 400),
    )
    if status == "error":
        data.update(quality=None, error="RuntimeError: CUDA out of memory", checkpoint=None, history=[])
    elif status == "diverged":
        data.update(quality=float("nan"), error="loss became NaN at step 120")
    elif status == "pruned":
        data.update(quality=round(ppl * 1.6, 2), steps=120)
    elif status == "running":
        data.update(quality=None)
    return data


def make_fake_results(root: Path, seed: int = 0, n_trials: int = 15) -> dict[str, Path]:
    """Write two experiments and a reference folder under `root`; returns {name: directory}."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    dirs = {}
    failures = {3: "error", 8: "diverged", 11: "pruned"}
    # The ASHA experiment's folder name differs from its search name (given by search_meta.json); the TPE one
    # has no meta file, so its folder name is its search name.
    for name, folder, skill in (("kron-gpt2-asha", "ray_results/asha_2024-11-21", 1.0),
                                ("kron-gpt2-tpe", "kron-gpt2-tpe", 1.25)):
        exp = root / folder
        dirs[name] = exp
        if folder != name:
            write_json(exp / "search_meta.json", {
                "name": name, "method": "kronecker",
                "objectives": [{"name": "quality", "mode": "min"}, {"name": "params", "mode": "min"}],
            })
        for i in range(n_trials):
            trial_id = f"{rng.integers(16**5):05x}_{i:05d}"
            status = failures.get(i, "complete") if name == "kron-gpt2-asha" else ("error" if i == 5 else "complete")
            data = trial(rng, trial_id, None, skill, status)
            write_json(exp / f"trainable_{trial_id}_lr={3e-4:.0e}" / "trial_summary.json", data)
    refs = root / "references"
    dirs["references"] = refs
    references = [
        summary(trial_id="teacher", method="teacher", label="teacher", quality=TEACHER_PPL, params=TEACHER_PARAMS,
                compression_ratio=1.0, plan_summary="dense teacher"),
        summary(trial_id="kngpt2", method="preset", label="kngpt2", quality=118.0, params=4_100_000,
                compression_ratio=TEACHER_PARAMS / 4.1e6),
        summary(trial_id="lowrank-r96", method="lowrank", label="lowrank r96", quality=196.0, params=3_300_000,
                compression_ratio=TEACHER_PARAMS / 3.3e6),
        summary(trial_id="layerdrop-u2", method="layerdrop", label="uniform:2", quality=171.0, params=5_250_000,
                compression_ratio=TEACHER_PARAMS / 5.25e6),
    ]
    for data in references:
        write_json(refs / data["trial_id"] / "trial_summary.json", data)
    return dirs


@pytest.fixture
def fake_results(tmp_path) -> dict[str, Path]:
    """{experiment name: directory} of a fake result set under tmp_path/"results"."""
    return make_fake_results(tmp_path / "results")


@pytest.fixture
def make_summary():
    """The `summary(**overrides)` factory: a valid trial summary dict."""
    return summary


@pytest.fixture
def write_summary(tmp_path):
    """Write a summary (dict, defaults from `summary`) to tmp_path/<rel>/trial_summary.json; returns the path."""

    def write(rel: str = "trial", **overrides) -> Path:
        return write_json(tmp_path / rel / "trial_summary.json", summary(**overrides))

    return write
