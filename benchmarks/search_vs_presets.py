"""Does the search beat the hand-designed plans? (issue: analysis, evidence)

    python benchmarks/search_vs_presets.py --data ../shared/data/wikitext-2 [--trials 24] [--steps 60]

1. A multi-objective search (TPE + ASHA, quality = WikiText-2 valid perplexity, size = parameters) of --trials
   plans for the bundled demo teacher: per layer and per matrix (embedding, Q/K/V, attention output, FFN in/out)
   whether to decompose it and with which Kronecker shape (2x to 32x per matrix).
2. Reference trials with the SAME trial settings and ILKD budget (--steps steps): the teacher itself, the `kngpt2`
   preset, `uniform:2`, the low-rank baseline `lowrank:2` (same matrices and size as uniform:2) and layer dropping
   (keep the odd layers, DistilGPT2-style, initialised from the teacher).
3. `analysis.compare` overlays everything in one plot and one table, and says for each reference whether a
   searched plan dominates it (no more parameters, no worse perplexity) and by how much.
Prints the comparison table and one JSON line; everything lands under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

SHARED = Path(__file__).resolve().parents[2] / "shared"


def base_trial(args) -> dict:
    return {
        "teacher": "demo",
        "data": {"source": str(Path(args.data).resolve()), "seq_len": 128, "max_train_tokens": 400_000,
                 "val_blocks": 64},
        "stage1": {"lr": args.lr, "warmup_steps": 10, "batch_size": 8, "max_steps": args.steps,
                   "eval_every": max(args.steps // 3, 1), "eval_batches": 8, "early_stopping": None,
                   "distill": {"emb": 0.5, "att": 0.5, "hid": 0.5, "ce": 0.1}},
        "seed": 0,
        "threads": 1,
        "save_checkpoint": False,
    }


def search_config(args) -> dict:
    return {
        "name": "search",
        "trial": base_trial(args),
        "space": {"groups": ["embedding", "attention", "attention_output", "ffn_in", "ffn_out"], "layers": "free",
                  "ranks": [1], "min_compression": 2, "max_compression": 32, "max_aspect": 16, "max_shapes": 6},
        "search": {"algorithm": "tpe", "num_samples": args.trials, "max_concurrent": 2, "resources": {"cpu": 1},
                   "seed": 0, "objectives": ["quality", "params_excl_output_embedding"],
                   "asha": {"grace_period": max(args.steps // 3, 1), "reduction_factor": 2},
                   "storage": str(Path(args.out).resolve()),
                   "reference": False},  # the teacher is among the reference trials below
    }


REFERENCES = {
    "teacher": {"method": "teacher"},
    "kngpt2": {"plan": {"preset": "kngpt2"}},
    "uniform:2": {"plan": {"preset": "uniform:2"}},
    "lowrank:2": {"method": "lowrank", "lowrank_ratio": 2.0},
    "layerdrop:odd": {"method": "layerdrop", "keep_layers": "odd"},
}


def _reference(label: str, cfg: dict, out: str) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from trials.trial import run_trial

    return run_trial({**cfg, "name": label}, output_dir=out, progress=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED / "data" / "wikitext-2"))
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--out", default="runs/search_vs_presets")
    p.add_argument("--skip-search", action="store_true", help="reuse an existing search under --out")
    args = p.parse_args(argv)
    if not Path(args.data).exists():
        raise SystemExit(f"data not found: {args.data}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    refs_dir = out / "references"
    todo = {label: {**base_trial(args), **patch} for label, patch in REFERENCES.items()
            if not (refs_dir / label.replace(":", "-") / "trial_summary.json").is_file()}
    if "teacher" in todo:
        todo["teacher"]["stage1"] = {**todo["teacher"]["stage1"], "max_steps": 0}
    with ProcessPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(_reference, label, cfg, str(refs_dir / label.replace(":", "-")))
                   for label, cfg in todo.items()]
        for f in futures:
            f.result()
    t_refs = time.time() - t0

    cfg_path = out / "search.yaml"
    cfg_path.write_text(yaml.safe_dump(search_config(args), sort_keys=False))
    if not args.skip_search:
        cmd = [sys.executable, "-m", "search.cli", "search", str(cfg_path)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    t_search = time.time() - t0 - t_refs

    from analysis.compare import compare

    # Sizes as in the KnGPT2 paper: without the output embedding (kept dense when the input embedding is factored).
    paths = compare([out / "search", refs_dir], out / "compare", labels=["search", "references"],
                    x="params_excl_output_embedding")
    import pandas as pd

    table = pd.read_csv(out / "compare" / "compare.csv")
    print((out / "compare" / "compare.md").read_text())
    print(json.dumps({"benchmark": "search_vs_presets", "trials": args.trials, "steps": args.steps,
                      "references_s": round(t_refs, 1), "search_s": round(t_search, 1),
                      "plot": str(paths.get("compare.png", out / "compare" / "compare.png")),
                      "table": json.loads(table.to_json(orient="records"))}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
