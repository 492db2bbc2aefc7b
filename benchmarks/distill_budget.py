"""Does ILKD recover a Kronecker student faster than plain cross-entropy training? (issue: trials, evidence)

    python benchmarks/distill_budget.py --data ../shared/data/wikitext-2 [--minutes 10] [--budgets 2 5 10]

Teacher: the bundled demo GPT-2 (`teacher: demo`). Student: the kngpt2 preset for its size (embedding f=2, the odd
layers' Q/K/V and FFN matrices at 2x). Two runs of the same student and budget, in parallel, one CPU thread each:
  - ILKD:    α = (emb 0.5, att 0.5, hid 0.5, ce 0.1), the KnGPT2 pre-training weights;
  - CE only: α = (0, 0, 0, 1) — the teacher's forward pass is skipped, so it gets more steps per minute.
The learning rate is constant after a short warm-up, so the validation perplexity logged at minute t of one run is
what a run with a t-minute budget would reach: one run per method gives every budget. Perplexity is measured on
the first --val-blocks blocks of WikiText-2 valid (seq_len 128 BPE tokens of the teacher's tokenizer), the same
blocks for the teacher, the student at SVD init, and every evaluation. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _config(name: str, data: str, minutes: float, alphas: dict, args) -> dict:
    return {
        "name": name,
        "teacher": args.teacher,
        "plan": {"preset": args.preset},
        "data": {"source": data, "seq_len": 128, "val_blocks": args.val_blocks},
        "stage1": {"lr": args.lr, "warmup_steps": 20, "batch_size": args.batch_size, "max_steps": 1_000_000,
                   "max_minutes": minutes, "eval_every": args.eval_every, "early_stopping": None,
                   "distill": alphas},
        "threads": 1,
        "seed": 0,
        "save_checkpoint": False,
    }


def _run(cfg: dict, out: str) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from trials.trial import run_trial

    return run_trial(cfg, output_dir=out, progress=False)


def _at_budget(history: list[dict], minutes: float) -> dict | None:
    """The last evaluation within `minutes` of training (time counted from the evaluation at step 0)."""
    if not history:
        return None
    t0 = history[0]["wall_time_s"]
    within = [h for h in history if h["wall_time_s"] - t0 <= minutes * 60 + 1e-6]
    return within[-1] if within else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"))
    p.add_argument("--teacher", default="demo")
    p.add_argument("--preset", default="kngpt2")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--budgets", type=float, nargs="+", default=[2, 5, 10])
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--val-blocks", type=int, default=256)
    p.add_argument("--out", default="runs/bench_distill_budget")
    args = p.parse_args(argv)
    if not Path(args.data).exists():
        raise SystemExit(f"data not found: {args.data} (give --data PATH to WikiText-2)")
    runs = {
        "ilkd": _config("ilkd", args.data, args.minutes, {"emb": 0.5, "att": 0.5, "hid": 0.5, "ce": 0.1}, args),
        "ce_only": _config("ce_only", args.data, args.minutes, {"emb": 0.0, "att": 0.0, "hid": 0.0, "ce": 1.0}, args),
    }
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=2) as pool:
        futures = {k: pool.submit(_run, cfg, str(Path(args.out) / k)) for k, cfg in runs.items()}
        results = {k: f.result() for k, f in futures.items()}
    wall = time.time() - t0
    teacher_ppl = _teacher_ppl(args)
    init = results["ilkd"]["history"][0]["quality"]
    print(f"teacher {args.teacher}: WikiText-2 valid perplexity {teacher_ppl:.2f} "
          f"(first {args.val_blocks} blocks of 128 tokens)")
    r = results["ilkd"]
    print(f"student ({args.preset}): {r['params_excl_output_embedding']:,} params excluding the output embedding, "
          f"{r['compression_ratio']:.2f}x fewer than the teacher; perplexity at SVD init {init:.2f}")
    print(f"{'budget':>8s} | {'ILKD ppl':>9s} {'steps':>6s} | {'CE-only ppl':>11s} {'steps':>6s}")
    rows = []
    for b in args.budgets:
        a = _at_budget(results["ilkd"]["history"], b)
        c = _at_budget(results["ce_only"]["history"], b)
        rows.append({"minutes": b, "ilkd_ppl": a and a["quality"], "ilkd_steps": a and a["step"],
                     "ce_ppl": c and c["quality"], "ce_steps": c and c["step"]})
        print(f"{b:>6.1f} m | {a['quality'] if a else float('nan'):>9.2f} {a['step'] if a else 0:>6d} | "
              f"{c['quality'] if c else float('nan'):>11.2f} {c['step'] if c else 0:>6d}")
    print(json.dumps({"benchmark": "distill_budget", "teacher": args.teacher, "preset": args.preset,
                      "teacher_ppl": teacher_ppl, "init_ppl": init, "params": r["params"],
                      "params_excl_output_embedding": r["params_excl_output_embedding"],
                      "params_teacher": r["params_teacher"], "compression_ratio": r["compression_ratio"],
                      "val_blocks": args.val_blocks, "rows": rows, "wall_s": wall}))
    return 0


def _teacher_ppl(args) -> float:
    import torch

    from trials.config import load_trial_config
    from trials.evaluate import evaluate_lm
    from trials.trial import load_lm_data, load_teacher

    torch.set_num_threads(2)
    cfg = load_trial_config(_config("teacher", args.data, 1, {}, args))
    teacher, tok = load_teacher(cfg, torch.device("cpu"))
    _, val = load_lm_data(cfg, teacher, tok, torch.device("cpu"))
    return evaluate_lm(teacher, val, 16, torch.device("cpu"))["quality"]


if __name__ == "__main__":
    raise SystemExit(main())
