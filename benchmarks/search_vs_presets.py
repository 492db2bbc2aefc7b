"""Does the search beat every plan a researcher could pick by hand? (#12, evidence)

    python benchmarks/search_vs_presets.py --data ../shared/data/wikitext-2 [--trials 24] [--steps 60]
    python benchmarks/search_vs_presets.py --teacher minilm [--trials 12] [--steps 40]

Everything below is trained with the SAME trial settings and ILKD budget (--steps steps, data-aware init for every
structure that has one), on the bundled demo teacher and WikiText-2 (quality = validation perplexity; size =
parameters without the output embedding, as in the KnGPT2 paper) or, with `--teacher minilm`, on all-MiniLM-L6-v2
fine-tuned on SST-2 (`common.ensure_minilm_teacher`; task distillation, quality = SST-2 dev accuracy; references
as below with the KroneckerBERT8 structure scaled to 384 wide in place of kngpt2):

1. `search`: the product as a user runs it — TPE + ASHA over per-layer, per-matrix choices of structure (Kronecker
   shape, low-rank rank, or dense) and the embedding's factor, seeded with `seed_plans: [auto, auto@<size>, ...]`
   (the automatic plans of the teacher's sensitivity at 3 sizes spread over the range, and one at each reference's
   size: the sizes the search is judged at; references within 1% of each other share the smallest) and the
   sensitivity prior (`space.prior`). `--seeds` replaces that list (the previous release's default: `--seeds auto`).
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
import time
from pathlib import Path

from common import add_teacher_args, evidence_trial, resolve_teacher_args, run_search, run_trials, search_config

PARTS = ("references", "search", "random", "auto")
# size axis: the KnGPT2 paper's (the output embedding left out) for the demo; a classifier has none
SIZE = "params_excl_output_embedding"


def _search_config(args, name: str, *, algorithm: str | None = None, seeds=None, prior: bool = True) -> dict:
    seeds = tuple(args.seeds) if seeds is None else seeds
    algorithm = algorithm or args.algorithm
    return search_config(name, evidence_trial(args), args.out, trials=args.trials, steps=args.steps, size=SIZE,
                         algorithm=algorithm, seeds=seeds, max_damage=args.max_damage if prior else None)


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


def references(teacher: str) -> dict[str, dict]:
    """label -> trial-config patch of every hand-made reference for this teacher (MiniLM: the KroneckerBERT8
    structure scaled to 384 wide, `glue_minilm.student_plan`, instead of GPT-2's kngpt2)."""
    if teacher != "minilm":
        return dict(REFERENCES)
    from glue_minilm import student_plan

    refs = {k: v for k, v in REFERENCES.items() if k != "kngpt2"}
    return {"teacher": refs.pop("teacher"), "kroneckerbert8-style": {"plan": student_plan(), "reference": True},
            **refs}


def reference_seeds(refs: Path, tolerance: float = 0.01) -> list[str]:
    """`auto@<size>` for the size of every hand-made reference trained under `refs` (the teacher left out), sizes
    within `tolerance` of a smaller one dropped: one automatic seed plan at each size the search is judged at."""
    sizes = []
    for path in sorted(refs.glob("*/trial_summary.json")):
        summary = json.loads(path.read_text())
        if summary.get("method") != "teacher" and summary.get(SIZE):
            sizes.append(int(summary[SIZE]))
    if not sizes:
        raise SystemExit(f"no reference results under {refs}: run the references part first (--parts references)")
    kept = []
    for size in sorted(sizes):
        if not kept or size > kept[-1] * (1 + tolerance):
            kept.append(size)
    return [f"auto@{size}" for size in kept]


def _run_all(todo: dict[str, tuple[dict, Path]]) -> None:
    run_trials({label: ({**cfg, "name": label}, out) for label, (cfg, out) in todo.items()})


def _no_training(cfg: dict) -> dict:
    stage = "stage2" if cfg.get("stage1") is None else "stage1"
    return {**cfg, stage: {**cfg[stage], "max_steps": 0}}


def _auto_plans(args, out: Path) -> dict[str, tuple[dict, Path]]:
    """The search's automatic seed plans as plain trials (the same plans `seed_plans: [auto]` evaluates first)."""
    from search.config import load_search_config
    from search.prepare import prepared_space

    cfg = load_search_config(_search_config(args, "search"))
    space = prepared_space(cfg)
    todo = {}
    for label, params in space.seeds:
        name = label.removeprefix("seed:").replace("@", "-")
        folder = out / "auto" / name
        if (folder / "trial_summary.json").is_file():
            continue
        plan = space.to_plan_dict(params, name=name)
        todo[name] = ({**evidence_trial(args), "method": "mixed", "plan": {"rules": plan["rules"]}, "label": name}, folder)
    return todo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_teacher_args(p)
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--max-damage", type=float, default=0.5, help="the search's space.prior.max_damage")
    p.add_argument("--algorithm", choices=("tpe", "nsga2"), default="tpe", help="the search part's sampler")
    p.add_argument("--seeds", nargs="+", default=None, metavar="PLAN",
                   help="the search's seed_plans (default: auto, 3 automatic plans over the size range, and "
                        "auto@<size> at every reference's size; e.g. auto:5); the auto part trains the automatic "
                        "ones alone")
    p.add_argument("--out", default=None, help="default runs/search_vs_presets[-minilm]")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--references", nargs="+", default=None, metavar="LABEL",
                   help="only these references (e.g. teacher lowrank:2 kngpt2), for a quick check at another budget")
    args = p.parse_args(argv)
    minilm = resolve_teacher_args(args, "search_vs_presets")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    if "references" in args.parts:
        t = time.time()
        refs = out / "references"
        todo = {label: ({**evidence_trial(args), **patch}, refs / label.replace(":", "-"))
                for label, patch in references(args.teacher).items()
                if not (refs / label.replace(":", "-") / "trial_summary.json").is_file()
                and (args.references is None or label in args.references)}
        if "teacher" in todo:
            todo["teacher"] = (_no_training(todo["teacher"][0]), todo["teacher"][1])
        _run_all(todo)
        timings["references_s"] = time.time() - t
    if args.seeds is None and {"search", "auto"} & set(args.parts):
        args.seeds = ["auto", *reference_seeds(out / "references")]
        print(f"seed_plans: {args.seeds}", flush=True)
    if "search" in args.parts:
        t = time.time()
        run_search(_search_config(args, "search"), out)
        timings["search_s"] = time.time() - t
    if "random" in args.parts:
        t = time.time()
        run_search(_search_config(args, "random", algorithm="random", seeds=(), prior=False), out)
        timings["random_s"] = time.time() - t
    if "auto" in args.parts:
        t = time.time()
        _run_all(_auto_plans(args, out))
        timings["auto_s"] = time.time() - t

    from analysis.compare import compare

    pools = [(out / name, name) for name in ("search", "random", "auto") if (out / name).is_dir()]
    sources = [p for p, _ in pools] + [out / "references"]
    labels = [n for _, n in pools] + ["references"]
    title = ("MiniLM fine-tuned on SST-2" if minilm else "demo teacher, WikiText-2") + ": searched vs hand-made plans"
    paths = compare(sources, out / "compare", labels=labels, x=SIZE, title=title)
    import pandas as pd

    table = pd.read_csv(out / "compare" / "compare.csv")
    print((out / "compare" / "compare.md").read_text())
    print(json.dumps({"benchmark": "search_vs_presets", "teacher": args.teacher, "trials": args.trials, "steps": args.steps,
                      "seeds": args.seeds,
                      **{k: round(v, 1) for k, v in timings.items()},
                      "plot": str(paths.get("compare.png", out / "compare" / "compare.png")),
                      "table": json.loads(table.to_json(orient="records"))}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
