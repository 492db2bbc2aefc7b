"""From small models to big ones: the layer-by-layer path (`kron.sequential`, `kronsearch compress --sequential`).

Part `feed` (the default): which inputs should feed the next layer when compressing layer by layer — the teacher
layer's outputs (`feed: teacher`, the same model as whole-model compression) or the compressed layer's (`feed:
compressed`, as SparseGPT / GPTQ do)? On each model of `--models` (demo, minilm, stories; as in
`benchmarks/autoplan.py --part evo`: their calibration data, held-out calibration tokens and quality measures),
for each plan of `--plans`, both feeds with data-aware init and no training: the KL to the teacher on the held-out
calibration tokens and the quality (perplexity on WikiText-2 valid blocks, or SST-2 dev accuracy), the compressed
feed paired against the teacher feed (95% interval / McNemar).

    python benchmarks/scale.py [--part feed] [--models demo,stories,minilm] [--plans lowrank:2,uniform:4,lowrank:4]
                               [--threads 1] [--calib-tokens 8192]

Prints a table and one JSON line ({"benchmark": "scale", ...}). (The memory and wall-time parts — GPT-2 small and
medium and a ~1B Llama, each stage with its peak RSS — are still to come.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


def feed_part(args) -> dict:
    from autoplan_evo import _kl, _verdict, setup_model
    from kron.sequential import LazyModel, sequential_compress
    from kron.models import load_tokenizer
    from trials.calibration import calibration_batches

    from kron.refine import PlanEvaluator

    out = {}
    for name in [n for n in args.models.split(",") if n]:
        m = setup_model(name, args)
        if m is None:
            continue
        seq = 64 if name == "minilm" else 128
        fit, held = calibration_batches(m["teacher"], load_tokenizer(m["src"]), m["source"], args.calib_tokens,
                                        seq_len=seq)
        measure = PlanEvaluator(m["teacher"], m["stats"], m["heldout"], (None,)).measure
        rows = [{"plan": "teacher", "feed": "-", "kl": 0.0, "quality": m["summary"](m["quality"](m["teacher"]))}]
        for plan in [p for p in args.plans.split(",") if p]:
            got = {}
            for feed in ("teacher", "compressed"):
                model, report = sequential_compress(LazyModel.open(m["src"], task="auto"), plan, fit, heldout=held,
                                                    feed=feed)
                q = m["quality"](model)
                got[feed] = q
                rows.append({"plan": plan, "feed": feed, "ratio": report.compression_ratio,
                             "kl": _kl(measure, model), "quality": m["summary"](q),
                             "vs_teacher_feed": None if feed == "teacher" else m["paired"](q, got["teacher"])})
                print(f"  {name} {plan} feed {feed}: KL {rows[-1]['kl']:.4f}, quality {rows[-1]['quality']:.2f}",
                      file=sys.stderr, flush=True)
        print(f"\n{name}: data-aware init layer by layer, no training; KL on {measure.tokens:,} held-out calibration "
              f"tokens; quality = {m['label']}")
        print(f"{'plan':<12} {'feed':<11} {'ratio':>6} {'KL':>8} {'quality':>9}  compressed vs teacher feed")
        for r in rows:
            print(f"{r['plan']:<12} {r['feed']:<11} {r.get('ratio', 1.0):>6.2f} {r['kl']:>8.4f} {r['quality']:>9.2f}"
                  f"  {_verdict(r.get('vs_teacher_feed'))}")
        out[name] = {"rows": rows, "quality": m["label"], "heldout_tokens": measure.tokens}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("feed",), default="feed")
    p.add_argument("--models", default="demo,stories,minilm")
    p.add_argument("--plans", default="lowrank:2,uniform:4,lowrank:4")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--eval-blocks", type=int, default=32)
    p.add_argument("--data", default=str(SHARED / "data" / "wikitext-2"))
    p.add_argument("--minilm-teacher", default="runs/minilm-sst2-teacher")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"benchmark": "scale", "feed": feed_part(args)}))


if __name__ == "__main__":
    main()
