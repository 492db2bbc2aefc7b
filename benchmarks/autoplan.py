"""Sensitivity profile + automatic plans (`kronsearch profile`, `kronsearch plan --auto`): cost and quality at init.

Part `gpt2` (timing only): GPT-2 small's shapes with random weights (`config:gpt2`) and synthetic token batches:
the time to collect the calibration statistics, profile every attention and FFN matrix (Kronecker and low-rank
candidates + keep, and `--kl-subset` of them per matrix measured at model level on 1,024 synthetic held-out tokens
(`--kl-tokens` fewer), as `kronsearch profile` does by default) and solve the knapsack at a few budgets.

Part `demo` (quality): the demo teacher (`kron.load_model("demo")`), calibration on 8,192 tokens of WikiText-2 train
(../shared/data/wikitext-2; teacher samples when absent). For each preset (uniform:2, uniform:4, lowrank:2,
lowrank:4, kngpt2) with data-aware init, and the automatic plan at the preset's size (`params=<preset's>`; for
kngpt2, whose compressed embedding unties the LM head, `ratio=<preset's>`), methods kronecker+lowrank and kronecker
only, with data-aware init: perplexity right after init (no distillation)
on the first 32 blocks of 128 tokens of WikiText-2 valid (`--eval-blocks`), and the profile's predicted damage of
each plan. Each automatic plan is also compared with its preset block by block (`common.paired_nll`): the change of
perplexity in percent with a 95% interval from the paired per-block NLL differences, and "better", "worse" or "tie"
(the interval holds 0).

    python benchmarks/autoplan.py [--part gpt2|demo|both] [--threads 1] [--max-shapes 8] [--shapes-per-level 2]
                                  [--kl-subset 4] [--kl-tokens 1024] [--damage proxy|kl|both] [--refine N]
                                  [--presets P1,P2] [--mixed-only]
    python benchmarks/autoplan.py --part evo [--evo-models demo,minilm,stories] [--evo-bytes 4,8]
                                  [--evo-generations 20] [--evo-offspring 12] [--evo-seed 0]

Part `evo` (`--part evo`, not in `both`; `benchmarks/autoplan_evo.py`): on `--evo-models` (demo, minilm, stories)
at `--evo-budgets` (default ratio=2,4,8) and, with `--evo-bytes 4,8`, at 1/4 and 1/8 of the teacher's bytes with
int8/int4 among the candidates: the uniform presets, the knapsack plan (damage kl; the word embedding's factors 2,
4, 8 profiled, as `kronsearch profile` does by default), the same refined (`--refine N`, default 40) and evolved on
the model (`kron.evo`, `--evo-generations` x `--evo-offspring`, `--evo-seed`): the joint KL on the held-out
calibration tokens (what both searches minimise), the quality right after data-aware init on data no search saw
(perplexity on WikiText-2 valid blocks; SST-2 dev accuracy for minilm), paired against the knapsack's plan, and
what each search cost.

`--refine N`: each automatic plan is also refined on the model (`kron.refine`: exchange moves judged by the joint
KL of the whole compressed model on the held-out calibration batches, at most N measurements) — a "+refine" row.
`--presets` picks the presets (default all five).

`--damage kl` (or `both`): the automatic plans also minimise the summed model-level KL (`kron.autoplan.kl_damages`:
the profile's `--kl-subset` measurements per matrix, interpolated along the proxy); give `--kl-subset 4` or more.

Prints tables and one JSON line ({"benchmark": "autoplan", ...}).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from common import block_nlls, paired_nll  # noqa: E402

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
PRESETS = ("uniform:2", "uniform:4", "lowrank:2", "lowrank:4", "kngpt2")


def _bar(what):
    t0 = time.time()

    def progress(done, total, name):
        if done == total or done % max(total // 8, 1) == 0:
            print(f"  {what}: {done}/{total} matrices ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    return progress


def plan_damage(profile, resolved) -> float:
    """The profile's predicted damage of a resolved plan (sum over matrices of the chosen candidate's damage; NaN
    when a chosen spec was not profiled, e.g. the rank lowrank:<f> picks)."""
    total = 0.0
    for name, mx in profile["matrices"].items():
        spec = resolved.get(name, "keep")
        if spec == "keep":
            continue
        d = spec.to_dict()
        hit = [c for c in mx["candidates"] if c["method"] == spec.method and c["spec"] == d]
        total += hit[0]["damage"] if hit else float("nan")
    return total


def _ppl(nlls) -> float:
    return math.exp(float(nlls.mean()))


def gpt2_part(args) -> dict:
    from kron import load_model
    from kron.autoplan import Constraints, auto_plan, parse_budget
    from kron.calibration import collect_input_stats
    from kron.profile import profile_model

    model = load_model("config:gpt2", device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    fit = [torch.randint(0, model.config.vocab_size, (8, 128), generator=g) for _ in range(args.gpt2_tokens // 1024)]
    held = [torch.randint(0, model.config.vocab_size, (8, 128), generator=g)]  # 1,024 tokens, as the CLI holds out
    t0 = time.time()
    stats = collect_input_stats(model, fit)
    stats_s = time.time() - t0
    c = Constraints(max_shapes=args.max_shapes, shapes_per_level=args.shapes_per_level)
    t0 = time.time()
    prof = profile_model(model, stats, constraints=c, source="config:gpt2", heldout=held if args.kl_subset else None,
                         kl_subset=args.kl_subset, kl_tokens=args.kl_tokens, progress=_bar("gpt2"))
    prof_s = time.time() - t0
    by_group: dict[str, float] = {}
    for mx in prof["matrices"].values():
        by_group[mx["group"]] = by_group.get(mx["group"], 0.0) + mx["seconds"]
    t0 = time.time()
    plans = {}
    for b in ("ratio=1.5", "ratio=2", "params=100M"):
        try:
            sol = auto_plan(prof, parse_budget(b))
            plans[b] = {"damage": sol.damage, "gap": sol.gap, "exact": sol.exact}
        except Exception as exc:  # an unreachable budget is a result too
            plans[b] = {"error": str(exc)}
    solve_s = time.time() - t0
    n_cand = sum(len(mx["candidates"]) for mx in prof["matrices"].values())
    out = {"matrices": len(prof["matrices"]), "candidates": n_cand, "calib_tokens": stats.tokens,
           "stats_s": round(stats_s, 1), "profile_s": round(prof_s, 1), "solve_s": round(solve_s, 2),
           "profile_s_by_group": {k: round(v, 1) for k, v in by_group.items()}, "plans": plans,
           "constraints": c.to_dict(), "threads": torch.get_num_threads(), "kl_subset": args.kl_subset,
           "kl_tokens": args.kl_tokens}
    print(f"GPT-2 small shapes (random weights, {stats.tokens:,} synthetic tokens, {torch.get_num_threads()} "
          f"thread(s), {args.kl_subset} KL measurements per matrix on {min(args.kl_tokens, 1024):,} tokens): statistics {stats_s:.1f} s; profile of {out['matrices']} matrices x {n_cand} candidates "
          f"{prof_s:.1f} s ({', '.join(f'{k} {v:.0f} s' for k, v in by_group.items())}); 3 knapsacks {solve_s:.2f} s")
    for b, r in plans.items():
        print(f"  {b}: " + (r["error"] if "error" in r else f"damage {r['damage']:.4g}, gap {r['gap']:.2g}"))
    return out


def demo_part(args) -> dict:
    from kron import load_model
    from kron.autoplan import Budget, Constraints, auto_plan, resolved_specs
    from kron.models import load_tokenizer, resolve_source
    from kron.plan import CompressionPlan
    from kron.presets import get_plan
    from kron.profile import profile_model
    from kron.refine import refine_plan
    from kron.surgery import compress, default_split
    from trials.calibration import calibration_batches, calibration_stats
    from trials.data import load_text_blocks

    src = resolve_source("demo")
    teacher = load_model(src, device="cpu").eval()
    tok = load_tokenizer(src)
    data = Path(args.data)
    source = str(data) if data.exists() else "teacher-samples"
    blocks = load_text_blocks(data, tok, 128, "valid")[: args.eval_blocks] if data.exists() else None
    if blocks is None:
        sys.exit(f"WikiText-2 valid not found at {data}: no perplexity to report (pass --data DIR)")
    t0 = time.time()
    stats = calibration_stats(teacher, tok, source, args.calib_tokens, seq_len=128, model_id="demo")
    heldout = calibration_batches(teacher, tok, source, args.calib_tokens, seq_len=128)[1]
    calib_s = time.time() - t0
    c = Constraints(max_shapes=args.max_shapes, shapes_per_level=args.shapes_per_level)
    t0 = time.time()
    prof = profile_model(teacher, stats, constraints=c, source="demo", heldout=heldout, kl_subset=args.kl_subset,
                         kl_tokens=args.kl_tokens, progress=_bar("demo"))
    prof_s = time.time() - t0
    corr = prof["correlation"]
    rho = corr["spearman"]
    teacher_ppl = _ppl(block_nlls(teacher, blocks))
    rows = [{"plan": "teacher", "params": prof["model"]["params"], "ppl": teacher_ppl, "damage": 0.0}]
    for preset in args.presets.split(","):
        plan = get_plan(preset, teacher.config)
        rep = compress(teacher, plan, init="data", calib=stats, inplace=False)
        resolved = plan.resolve(teacher, split=default_split("data"))
        preset_nll = block_nlls(rep.model, blocks)
        ppl = _ppl(preset_nll)
        row = {"plan": preset, "params": rep.params_after, "macs": rep.macs_per_token_after, "ppl": ppl,
               "ratio": rep.compression_ratio, "damage": plan_damage(prof, resolved)}
        rows.append(row)
        print(f"  {preset}: ppl {ppl:.2f}", file=sys.stderr, flush=True)
        damages = ("proxy", "kl") if args.damage == "both" else (args.damage,)
        combos = [(methods, tag + ("" if dmg == "proxy" else " kl"), dmg)
                  for methods, tag in ((["kronecker", "lowrank"], "auto"), (["kronecker"], "auto kron"))
                  if not (args.mixed_only and methods == ["kronecker"])
                  for dmg in damages]
        for methods, tag, damage in combos:
            # kngpt2 compresses the word embedding, which unties GPT-2's LM head (a dense copy stays): its total
            # parameters exceed the teacher's. Its size is then compared as the compression ratio (parameters
            # excluding the output embedding); the others at equal total parameters.
            if preset == "kngpt2":
                budget = Budget.on("ratio", rep.compression_ratio, f"ratio={rep.compression_ratio:.4f}")
            else:
                budget = Budget.on("params", rep.params_after, f"params={rep.params_after}")
            try:
                sol = auto_plan(prof, budget, methods=methods, damage=damage)
            except Exception as exc:
                rows.append({"plan": f"{tag} @ {preset}", "params": None, "ppl": None, "damage": None,
                             "error": str(exc)})
                continue
            versions = [(tag, sol, None)]
            if args.refine:
                r = refine_plan(teacher, stats, prof, budget, sol, heldout, methods=methods, damage=damage,
                                max_evals=args.refine)
                versions.append((tag + " +refine", r.solution, r))
            for name, s, r in versions:
                auto = CompressionPlan.from_resolved(resolved_specs(s))
                arep = compress(teacher, auto, init="data", calib=stats, inplace=False)
                nll = block_nlls(arep.model, blocks)
                kinds = {}
                for o in s.choice.values():
                    k = o.spec if o.spec == "keep" else o.spec["method"]
                    kinds[k] = kinds.get(k, 0) + 1
                rows.append({"plan": f"{name} @ {preset}", "params": arep.params_after,
                             "ratio": arep.compression_ratio, "macs": arep.macs_per_token_after,
                             "ppl": _ppl(nll), "vs_preset": paired_nll(nll, preset_nll), "damage": s.damage,
                             "damage_kind": "kl, joint" if r else damage, "gap": s.gap, "mix": kinds,
                             "refinement": r.to_dict() if r else None})
    print(f"\ndemo teacher: calibration {stats.tokens:,} fit + {stats.heldout_tokens:,} held-out tokens of "
          f"{'WikiText-2 train' if source != 'teacher-samples' else 'teacher samples'} ({calib_s:.1f} s); profile "
          f"{len(prof['matrices'])} matrices, {sum(len(m['candidates']) for m in prof['matrices'].values())} "
          f"candidates in {prof_s:.1f} s; proxy vs KL Spearman "
          f"{'n/a' if rho is None else format(rho, '.3f')} "
          f"over {corr['pairs']} candidates; perplexity after init (no distillation) on {blocks.shape[0]} blocks of "
          "128 tokens of WikiText-2 valid")
    print(f"{'plan':<24} {'params':>10} {'ratio':>6} {'MACs/token':>11} {'pred. damage':>13} {'ppl':>9} "
          f"{'vs preset, 95% CI':>27}  mix")
    for r in rows:
        if r.get("error"):
            print(f"{r['plan']:<24} {r['error']}")
            continue
        mix = ", ".join(f"{k} {v}" for k, v in (r.get("mix") or {}).items())
        dmg = "n/a" if r["damage"] is None or r["damage"] != r["damage"] else f"{r['damage']:.4g}"
        ratio = f"{r['ratio']:.3f}" if r.get("ratio") else "1"
        vs = r.get("vs_preset")
        vs = (f"{vs['ppl_change_pct']:+.2f}% [{vs['ci_pct'][0]:+.2f}, {vs['ci_pct'][1]:+.2f}] {vs['verdict']}"
              if vs else "")
        print(f"{r['plan']:<24} {r['params']:>10,} {ratio:>6} {r.get('macs', 0) or 0:>11,} {dmg:>13} "
              f"{r['ppl']:>9.2f} {vs:>27}  {mix}")
    return {"teacher_ppl": teacher_ppl, "rows": rows, "profile_s": round(prof_s, 1), "calib_s": round(calib_s, 1),
            "spearman": corr["spearman"], "kl_pairs": corr["pairs"], "constraints": c.to_dict(),
            "eval_blocks": int(blocks.shape[0]), "calib_tokens": stats.tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("gpt2", "demo", "both", "evo"), default="both",
                   help="evo: the knapsack plan, +refine and +evo (kron.evo) at --evo-budgets (not part of both)")
    p.add_argument("--evo-budgets", default="ratio=2,ratio=4,ratio=8")
    p.add_argument("--evo-generations", type=int, default=20)
    p.add_argument("--evo-offspring", type=int, default=12)
    p.add_argument("--evo-seed", type=int, default=0)
    p.add_argument("--evo-models", default="demo", help="evo: the models, comma-separated: demo, minilm, stories")
    p.add_argument("--evo-bytes", default="", metavar="F1,F2",
                   help="evo: also budgets of 1/F of the teacher's bytes, int8 and int4 among the candidates")
    p.add_argument("--minilm-teacher", default="runs/minilm-sst2-teacher",
                   help="evo: where the SST-2 fine-tuned MiniLM is (made there when absent, ~12 min)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-shapes", type=int, default=8)
    p.add_argument("--shapes-per-level", type=int, default=2)
    p.add_argument("--gpt2-tokens", type=int, default=4096)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--kl-subset", type=int, default=4,
                   help="candidates per matrix measured at model level (the profile's default; gpt2 part too)")
    p.add_argument("--kl-tokens", type=int, default=1024,
                   help="held-out tokens of each model-level measurement (the CLI's --kl-tokens; at most what "
                        "the part holds out: 1,024 in the gpt2 part)")
    p.add_argument("--eval-blocks", type=int, default=32)
    p.add_argument("--damage", choices=("proxy", "kl", "both"), default="proxy",
                   help="what the automatic plans minimise (kron.autoplan damage; both: a row for each)")
    p.add_argument("--refine", type=int, default=0, metavar="N",
                   help="also each automatic plan refined on the model (kron.refine, at most N joint KL "
                        "measurements on the held-out calibration batches); a '+refine' row each")
    p.add_argument("--mixed-only", action="store_true",
                   help="only the automatic plans over Kronecker and low-rank (no Kronecker-only rows)")
    p.add_argument("--presets", default=",".join(PRESETS), help="the presets to compare (comma-separated)")
    p.add_argument("--data", default=str(SHARED / "data" / "wikitext-2"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = {"benchmark": "autoplan"}
    if args.part in ("demo", "both"):
        result["demo"] = demo_part(args)
    if args.part in ("gpt2", "both"):
        result["gpt2"] = gpt2_part(args)
    if args.part == "evo":
        from autoplan_evo import evo_part

        result["evo"] = evo_part(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
