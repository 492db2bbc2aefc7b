"""Does the search beat every plan a researcher could pick by hand? (#12, evidence)

    python benchmarks/search_vs_presets.py --data ../shared/data/wikitext-2 [--trials 24] [--steps 60]

Everything below is trained with the SAME trial settings and ILKD budget (--steps steps, data-aware init for every
structure that has one), on the bundled demo teacher and WikiText-2 (quality = validation perplexity; size =
parameters without the output embedding, as in the KnGPT2 paper):

1. `search`: the product as a user runs it — TPE + ASHA over per-layer, per-matrix choices of structure (Kronecker
   shape, low-rank rank, or dense) and the embedding's factor, seeded with `seed_plans: [auto]` (the automatic
   plans of the teacher's sensitivity at 3 sizes) and the sensitivity prior (`space.prior`).
2. `random`: the same space and number of trials, sampled at random, no seeds, no prior, no early stopping
   interplay beyond the same ASHA: does the searcher add anything over chance?
3. `auto`: the automatic plans alone (what `seed_plans: [auto]` evaluates first), each trained as a plain trial:
   does the search add anything over them?
4. references: the teacher, `kngpt2`, `uniform:2`, `uniform:4`, `lowrank:2`, `lowrank:4` (whitened low-rank),
   `prune:2` (structured pruning: half the heads and FFN neurons), and layer dropping (the odd layers).

`analysis.compare` overlays everything in one plot and one table: for each reference, the best plan of each pool
at no larger size and whether it dominates the reference; the hypervolume of each pool against a common reference
point. Prints the tables and one JSON line; everything lands under --out. Parts already run are reused (delete a
part's folder to rerun it); --parts picks which to run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import demo_wikitext_trial, run_trials

SHARED = Path(__file__).resolve().parents[2] / "shared"
PARTS = ("references", "search", "random", "auto")


def base_trial(args) -> dict:
    return demo_wikitext_trial(args.data, args.steps, args.lr)


def search_config(args, name: str, *, algorithm: str = "tpe", seeds=("auto",), prior: bool = True) -> dict:
    space = {"groups": ["embedding", "attention", "attention_output", "ffn_in", "ffn_out"], "layers": "free",
             "methods": ["kronecker", "lowrank"], "ranks": [1], "min_compression": 2, "max_compression": 32,
             "max_aspect": 16, "max_shapes": 6, "allow_keep": True}
    if prior:
        space["prior"] = {"max_damage": args.max_damage}
    return {
        "name": name,
        "trial": base_trial(args),
        "space": space,
        "search": {"algorithm": algorithm, "num_samples": args.trials, "max_concurrent": 2, "resources": {"cpu": 1},
                   "seed": 0, "objectives": ["quality", "params_excl_output_embedding"],
                   "asha": {"grace_period": max(args.steps // 3, 1), "reduction_factor": 2},
                   "storage": str(Path(args.out).resolve()), "seed_plans": list(seeds),
                   "reference": False},  # the teacher is among the reference trials below
    }


REFERENCES = {
    "teacher": {"method": "teacher"},
    "kngpt2": {"plan": {"preset": "kngpt2"}},
    "uniform:2": {"plan": {"preset": "uniform:2"}},
    "uniform:4": {"plan": {"preset": "uniform:4"}},
    "lowrank:2": {"method": "lowrank", "lowrank_ratio": 2.0},
    "lowrank:4": {"method": "lowrank", "lowrank_ratio": 4.0},
    "prune:2": {"method": "prune", "plan": {"preset": "prune:2"}},
    "layerdrop:odd": {"method": "layerdrop", "keep_layers": "odd"},
}


def _run_all(todo: dict[str, tuple[dict, Path]]) -> None:
    run_trials({label: ({**cfg, "name": label}, out) for label, (cfg, out) in todo.items()})


def _search(args, cfg: dict, out: Path) -> None:
    if any((out / cfg["name"]).glob("experiment_state-*.json")):
        return  # already run
    path = out / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "search.cli", "search", str(path)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _auto_plans(args, out: Path) -> dict[str, tuple[dict, Path]]:
    """The search's automatic seed plans as plain trials (the same plans `seed_plans: [auto]` evaluates first)."""
    from search.config import load_search_config
    from search.space import SearchSpace

    cfg = load_search_config(search_config(args, "search"))
    space = SearchSpace.from_config(cfg)
    todo = {}
    for label, params in space.seeds:
        name = label.removeprefix("seed:").replace("@", "-")
        folder = out / "auto" / name
        if (folder / "trial_summary.json").is_file():
            continue
        plan = space.to_plan_dict(params, name=name)
        todo[name] = ({**base_trial(args), "method": "mixed", "plan": {"rules": plan["rules"]}, "label": name}, folder)
    return todo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED / "data" / "wikitext-2"))
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-damage", type=float, default=0.5, help="the search's space.prior.max_damage")
    p.add_argument("--out", default="runs/search_vs_presets")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    args = p.parse_args(argv)
    if not Path(args.data).exists():
        raise SystemExit(f"data not found: {args.data}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    if "references" in args.parts:
        t = time.time()
        refs = out / "references"
        todo = {label: ({**base_trial(args), **patch}, refs / label.replace(":", "-"))
                for label, patch in REFERENCES.items()
                if not (refs / label.replace(":", "-") / "trial_summary.json").is_file()}
        if "teacher" in todo:
            todo["teacher"][0]["stage1"] = {**todo["teacher"][0]["stage1"], "max_steps": 0}
        _run_all(todo)
        timings["references_s"] = time.time() - t
    if "search" in args.parts:
        t = time.time()
        _search(args, search_config(args, "search"), out)
        timings["search_s"] = time.time() - t
    if "random" in args.parts:
        t = time.time()
        _search(args, search_config(args, "random", algorithm="random", seeds=(), prior=False), out)
        timings["random_s"] = time.time() - t
    if "auto" in args.parts:
        t = time.time()
        _run_all(_auto_plans(args, out))
        timings["auto_s"] = time.time() - t

    from analysis.compare import compare

    pools = [(out / name, name) for name in ("search", "random", "auto") if (out / name).is_dir()]
    sources = [p for p, _ in pools] + [out / "references"]
    labels = [n for _, n in pools] + ["references"]
    paths = compare(sources, out / "compare", labels=labels, x="params_excl_output_embedding",
                    title="demo teacher, WikiText-2: searched vs hand-made plans")
    import pandas as pd

    table = pd.read_csv(out / "compare" / "compare.csv")
    print((out / "compare" / "compare.md").read_text())
    print(json.dumps({"benchmark": "search_vs_presets", "trials": args.trials, "steps": args.steps,
                      **{k: round(v, 1) for k, v in timings.items()},
                      "plot": str(paths.get("compare.png", out / "compare" / "compare.png")),
                      "table": json.loads(table.to_json(orient="records"))}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
