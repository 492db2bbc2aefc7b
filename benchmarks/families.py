"""The compression families side by side at equal size in bytes (#13, evidence)

    python benchmarks/families.py --data ../shared/data/wikitext-2 [--steps 60] [--out runs/families]
    python benchmarks/families.py --teacher minilm [--steps 40]          # all-MiniLM-L6-v2 fine-tuned on SST-2
    ... --parts plans search [--trials 16]                               # + a search over every family

The bundled demo teacher on WikiText-2 (quality = validation perplexity) or, with `--teacher minilm`, MiniLM
fine-tuned on SST-2 (`common.ensure_minilm_teacher`; task distillation, quality = SST-2 dev accuracy); every plan
trained with the SAME trial settings and distillation budget (--steps steps, data-aware init / calibration-based
importance where the method has one):

* Kronecker (`uniform:f`, data-aware), low-rank (`lowrank:f`, whitened), structured pruning (`prune:f`), each making
  the attention and FFN matrices f-fold smaller (f = 2, 4, 8);
* layer dropping: keep the odd layers (2x fewer layer weights) or a quarter of the layers (4x on the demo's 4
  layers, 3x on MiniLM's 6: layers 2 and 5);
* int8 alone (every attention and FFN matrix as int8 weights + float32 scales: ~4x fewer bytes there);
* the stacks Kronecker+int8, low-rank+int8 and pruning+int8 (`prune:` rules with `quantize: int8`, a prune trial)
  at f = 2 and 4 (~8x and ~16x fewer bytes in those matrices).

The teacher is evaluated once (no training). For each plan the table gives its weight bytes (the whole model's:
each tensor's elements x stored width, scales included), bytes ratio to the float32 teacher over the whole model and
over the compressed matrices' target, quality after training, and inference speed on this CPU (tokens/s of the
trial's evaluation, one thread). Part `search`: a search whose space holds every family per matrix / per block
(`space.methods: [kronecker, lowrank, prune]`, `quantize: [none, int8]`, `objectives: [quality, bytes]`, TPE + ASHA,
automatic seed plans and the sensitivity prior, same trial budget), compared with every plan above at equal bytes
(`analysis.compare --x bytes`: for each plan, the best searched plan at no more bytes). Prints the tables and one
JSON line; results under --out (parts already run are reused). One plot: quality vs bytes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import add_teacher_args, evidence_trial, resolve_teacher_args, run_search, run_trials, search_config

PARTS = ("plans", "search")


def _teacher_config(args):
    from kron.models import demo_teacher_dir, load_config

    return load_config(str(Path(args.teacher_dir).resolve()) if args.teacher == "minilm" else str(demo_teacher_dir()))


def _preset_rules(name: str, config, *, int8: bool = False) -> list[dict]:
    from kron.presets import get_plan

    rules = get_plan(name, config).to_dict()["rules"]
    return [{**r, "quantize": "int8"} if int8 else r for r in rules]


def plans(config) -> dict[str, tuple[str, float, dict]]:
    """label -> (family, nominal fold of the compressed matrices' bytes, trial-config patch), for a teacher config."""
    out: dict[str, tuple[str, float, dict]] = {"teacher": ("teacher", 1.0, {"method": "teacher"})}
    for f in (2, 4, 8):
        out[f"kronecker x{f}"] = ("kronecker", f, {"method": "mixed",
                                                   "plan": {"rules": _preset_rules(f"uniform:{f}", config)}})
        out[f"lowrank x{f}"] = ("lowrank", f, {"method": "mixed",
                                               "plan": {"rules": _preset_rules(f"lowrank:{f}", config)}})
        out[f"prune x{f}"] = ("prune", f, {"method": "prune", "plan": {"preset": f"prune:{f}"}})
    n = config.num_hidden_layers
    out["layerdrop x2"] = ("layerdrop", 2, {"method": "layerdrop", "keep_layers": "odd"})
    keep = max(1, round(n / 4))
    out[f"layerdrop x{n / keep:g}"] = ("layerdrop", n / keep, {
        "method": "layerdrop", "keep_layers": sorted(n - 1 - i * (n // keep) for i in range(keep))})
    # every attention and FFN matrix (the selects of the uniform preset) as int8, without the preset's structure
    int8_rules = [{"select": r["select"], "quantize": "int8"} for r in _preset_rules("uniform:2", config)]
    out["int8"] = ("int8", 4, {"method": "mixed", "plan": {"rules": int8_rules}})
    for f in (2, 4):
        out[f"kronecker x{f} + int8"] = ("kronecker+int8", 4 * f, {"method": "mixed", "plan": {
            "rules": _preset_rules(f"uniform:{f}", config, int8=True)}})
        out[f"lowrank x{f} + int8"] = ("lowrank+int8", 4 * f, {"method": "mixed", "plan": {
            "rules": _preset_rules(f"lowrank:{f}", config, int8=True)}})
        out[f"prune x{f} + int8"] = ("prune+int8", 4 * f, {"method": "prune", "plan": {
            "rules": _preset_rules(f"prune:{f}", config, int8=True)}})
    return out


def _search_config(args) -> dict:
    return search_config("search-all", evidence_trial(args), args.out, trials=args.trials, steps=args.steps,
                         size="bytes", max_damage=args.max_damage, methods=("kronecker", "lowrank", "prune"),
                         quantize=["none", "int8"])


def _folder(out: Path, label: str) -> Path:
    return out / "trials" / label.replace(" ", "_").replace("+", "plus")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_teacher_args(p)
    p.add_argument("--out", default=None, help="default runs/families[-minilm]")
    p.add_argument("--only", nargs="*", default=None, help="labels to run (default: all)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=["plans"])
    p.add_argument("--trials", type=int, default=16, help="trials of the search over every family")
    p.add_argument("--max-damage", type=float, default=0.5, help="the search's space.prior.max_damage")
    args = p.parse_args(argv)
    minilm = resolve_teacher_args(args, "families")
    out = Path(args.out).resolve()
    t0 = time.time()
    table = plans(_teacher_config(args))
    if "plans" in args.parts:
        todo = {}
        for label, (_, _, patch) in table.items():
            if args.only and label not in args.only:
                continue
            if (_folder(out, label) / "trial_summary.json").is_file():
                continue
            cfg = {**evidence_trial(args), **patch, "label": label}
            if label == "teacher":
                stage = "stage2" if minilm else "stage1"
                cfg[stage] = {**cfg[stage], "max_steps": 0}
            todo[label] = ({**cfg, "name": label.replace(" ", "").replace("+", "-")}, _folder(out, label))
        run_trials(todo)
    if "search" in args.parts:
        run_search(_search_config(args), out)

    rows = []
    teacher_bytes = None
    for label, (family, fold, _) in table.items():
        path = _folder(out, label) / "trial_summary.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        if family == "teacher":
            teacher_bytes = s.get("bytes")
        rows.append({"label": label, "family": family, "fold": fold, "status": s.get("status"),
                     "quality": s.get("quality"), "params": s.get("params"), "bytes": s.get("bytes"),
                     "tokens_per_s": s.get("throughput_tokens_per_s")})
    for r in rows:
        r["bytes_ratio"] = (teacher_bytes / r["bytes"]) if teacher_bytes and r["bytes"] else None
    what, qname = (("MiniLM on SST-2, dev accuracy", "acc") if minilm else ("demo teacher, WikiText-2 valid perplexity",
                                                                           "ppl"))
    print(f"{what} after {args.steps} distillation steps; bytes = weight storage of the whole model")
    header = f"{'plan':<22} {'family':<15} {'target':>7} {'bytes':>11} {'÷ teacher':>9} {qname:>8} {'tok/s':>8}"
    print(header + "\n" + "-" * len(header))
    for r in sorted(rows, key=lambda r: (-(r["bytes"] or 0))):
        q = r["quality"]
        qtext = (f"{q:.4f}" if minilm else f"{q:.1f}") if isinstance(q, (int, float)) else str(r["status"])
        print(f"{r['label']:<22} {r['family']:<15} {('x%g' % r['fold']) if r['fold'] != 1 else '-':>7} "
              f"{(r['bytes'] or 0):>11,} {(r['bytes_ratio'] or 0):>8.2f}x {qtext:>8} {(r['tokens_per_s'] or 0):>8.0f}")
    png = _plot(rows, out / "families.png", title=f"{what.split(',')[0]}: quality vs bytes, same training budget",
                ylabel="SST-2 dev accuracy" if minilm else "validation perplexity", log=not minilm)
    result = {"benchmark": "families", "teacher": args.teacher, "steps": args.steps,
              "seconds": round(time.time() - t0, 1), "plot": str(png) if png else None, "rows": rows}
    search_dir = out / "search-all"
    if search_dir.is_dir():
        from analysis.compare import compare

        compare([search_dir, out / "trials"], out / "compare", labels=["search (every family)", "plans"], x="bytes",
                title=f"{what.split(',')[0]}: a search over every family vs each family's plans, by bytes")
        print((out / "compare" / "compare.md").read_text())
        import pandas as pd

        result["compare"] = json.loads(pd.read_csv(out / "compare" / "compare.csv").to_json(orient="records"))
    print(json.dumps(result, default=str))
    return 0


def _plot(rows, path: Path, *, title: str, ylabel: str, log: bool):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    fams = sorted({r["family"] for r in rows})
    for fam in fams:
        pts = sorted((r["bytes"], r["quality"]) for r in rows if r["family"] == fam and r["bytes"]
                     and isinstance(r["quality"], (int, float)))
        if pts:
            ax.plot([x / 1e6 for x, _ in pts], [y for _, y in pts], marker="*" if fam == "teacher" else "o",
                    label=fam, linestyle="-" if len(pts) > 1 else "none")
    ax.set_xlabel("weight storage (MB)")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
