"""The compression families side by side at equal size in bytes (#13, evidence)

    python benchmarks/families.py --data ../shared/data/wikitext-2 [--steps 60] [--out runs/families]

The bundled demo teacher on WikiText-2 (quality = validation perplexity), every plan trained with the SAME trial
settings and ILKD budget (--steps steps, data-aware init / calibration-based importance where the method has one):

* Kronecker (`uniform:f`, data-aware), low-rank (`lowrank:f`, whitened), structured pruning (`prune:f`), each making
  the attention and FFN matrices f-fold smaller (f = 2, 4, 8);
* layer dropping: keep the odd layers (2x fewer layer weights) or one layer of four (4x);
* int8 alone (every attention and FFN matrix as int8 weights + float32 scales: ~4x fewer bytes there);
* the stacks Kronecker+int8 and low-rank+int8 at f = 2 and 4 (~8x and ~16x fewer bytes in those matrices);
  pruning+int8 is refused by this release (prune's block-wide steps do not pass through the int8 modifier yet).

The teacher is evaluated once (no training). For each plan the table gives its weight bytes (the whole model's:
each tensor's elements x stored width, scales included), bytes ratio to the float32 teacher over the whole model and
over the compressed matrices' target, perplexity after training, and inference speed on this CPU (tokens/s of the
trial's evaluation, one thread). Prints the table and one JSON line; results under --out (parts already run are
reused). One plot: perplexity vs bytes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import demo_wikitext_trial, run_trials

SHARED = Path(__file__).resolve().parents[2] / "shared"
MATRICES = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def base_trial(args) -> dict:
    return demo_wikitext_trial(args.data, args.steps, args.lr)


def _preset_rules(name: str, *, int8: bool = False) -> list[dict]:
    from kron.models import demo_teacher_dir, load_config
    from kron.presets import get_plan

    rules = get_plan(name, load_config(str(demo_teacher_dir()))).to_dict()["rules"]
    return [{**r, "quantize": "int8"} if int8 else r for r in rules]


def plans() -> dict[str, tuple[str, float, dict]]:
    """label -> (family, nominal fold of the compressed matrices' bytes, trial-config patch)."""
    out: dict[str, tuple[str, float, dict]] = {"teacher": ("teacher", 1.0, {"method": "teacher"})}
    for f in (2, 4, 8):
        out[f"kronecker x{f}"] = ("kronecker", f, {"method": "mixed", "plan": {"rules": _preset_rules(f"uniform:{f}")}})
        out[f"lowrank x{f}"] = ("lowrank", f, {"method": "mixed", "plan": {"rules": _preset_rules(f"lowrank:{f}")}})
        out[f"prune x{f}"] = ("prune", f, {"method": "prune", "plan": {"preset": f"prune:{f}"}})
    out["layerdrop x2"] = ("layerdrop", 2, {"method": "layerdrop", "keep_layers": "odd"})
    out["layerdrop x4"] = ("layerdrop", 4, {"method": "layerdrop", "keep_layers": [3]})
    out["int8"] = ("int8", 4, {"method": "mixed", "plan": {"rules": [{"select": MATRICES, "quantize": "int8"}]}})
    for f in (2, 4):
        out[f"kronecker x{f} + int8"] = ("kronecker+int8", 4 * f, {"method": "mixed", "plan": {
            "rules": _preset_rules(f"uniform:{f}", int8=True)}})
        out[f"lowrank x{f} + int8"] = ("lowrank+int8", 4 * f, {"method": "mixed", "plan": {
            "rules": _preset_rules(f"lowrank:{f}", int8=True)}})
    return out


def _folder(out: Path, label: str) -> Path:
    return out / "trials" / label.replace(" ", "_").replace("+", "plus")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED / "data" / "wikitext-2"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--out", default="runs/families")
    p.add_argument("--only", nargs="*", default=None, help="labels to run (default: all)")
    args = p.parse_args(argv)
    if not Path(args.data).exists():
        raise SystemExit(f"data not found: {args.data}")
    out = Path(args.out).resolve()
    t0 = time.time()
    todo = {}
    table = plans()
    for label, (_, _, patch) in table.items():
        if args.only and label not in args.only:
            continue
        if (_folder(out, label) / "trial_summary.json").is_file():
            continue
        cfg = {**base_trial(args), **patch, "label": label}
        if label == "teacher":
            cfg["stage1"] = {**cfg["stage1"], "max_steps": 0}
        todo[label] = ({**cfg, "name": label.replace(" ", "").replace("+", "-")}, _folder(out, label))
    run_trials(todo)

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
    print(f"demo teacher, WikiText-2 valid perplexity after {args.steps} ILKD steps; bytes = weight storage of the "
          "whole model")
    header = f"{'plan':<22} {'family':<15} {'target':>7} {'bytes':>11} {'÷ teacher':>9} {'ppl':>8} {'tok/s':>8}"
    print(header + "\n" + "-" * len(header))
    for r in sorted(rows, key=lambda r: (-(r["bytes"] or 0))):
        q = r["quality"]
        print(f"{r['label']:<22} {r['family']:<15} {('x%g' % r['fold']) if r['fold'] != 1 else '-':>7} "
              f"{(r['bytes'] or 0):>11,} {(r['bytes_ratio'] or 0):>8.2f}x "
              f"{(f'{q:.1f}' if isinstance(q, (int, float)) else str(r['status'])):>8} "
              f"{(r['tokens_per_s'] or 0):>8.0f}")
    png = _plot(rows, out / "families.png")
    print(json.dumps({"benchmark": "families", "steps": args.steps, "seconds": round(time.time() - t0, 1),
                      "plot": str(png) if png else None, "rows": rows}, default=str))
    return 0


def _plot(rows, path: Path):
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
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.set_title("demo teacher, WikiText-2: quality vs bytes, same training budget")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
