"""`benchmarks/autoplan.py --part evo`: uniform presets, the knapsack plan, the same refined and evolved on the model
(`kron.evo`), on one or more models, at compression ratios and, with quantisation among the candidates, at bytes
budgets. Every plan is built with data-aware init and judged without any training:

* the joint KL(teacher ‖ compressed model) on the held-out calibration tokens (what `kron.refine` and `kron.evo`
  minimise; one `kron.measure.ModelMeasure` for every plan of a model, presets included);
* its quality on data no search saw, paired against the knapsack's plan at the same budget: perplexity on
  validation blocks (`common.paired_nll`, 95% interval) for a language model, accuracy on every dev sentence
  (`common.mcnemar`, exact p < 0.05) for a classifier;
* what each search cost (measurements, tokens, seconds).

Models (`--evo-models`, comma-separated):

* `demo` — the bundled demo teacher (GPT-2, 4 layers), WikiText-2: 8,192 calibration tokens of train (1/8 held
  out), perplexity on `--eval-blocks` validation blocks of 128 tokens;
* `minilm` — all-MiniLM-L6-v2 fine-tuned on SST-2 (`common.ensure_minilm_teacher`, into `--minilm-teacher`),
  calibration on SST-2 training sentences (sequences of 64), accuracy on all 872 dev sentences;
* `stories` — stories260K (../shared/models/stories260K: a 260K-parameter Llama trained on TinyStories, grouped-query
  attention, 512-token vocabulary), WikiText-2 as for the demo (text it was not trained on: the KL still measures how
  far the compressed model's outputs move from the teacher's, the perplexities are high for every plan).

`--evo-bytes F1,F2` adds, per model, budgets of 1/F of the teacher's bytes with int8 and int4 among the candidates
(methods kronecker, lowrank, int8, int4: each structure also quantised), against the uniform int8 / int4 plans.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
STORIES = SHARED / "models" / "stories260K"


def _ppl(nlls) -> float:
    return math.exp(float(nlls.mean()))


def _kl(measure, student) -> float:
    """KL(teacher ‖ student) on the held-out batches of `measure` (a ModelMeasure of the teacher), position by
    position as `ModelMeasure` computes it, for a student that is another model object (a preset's)."""
    import torch.nn.functional as F

    num, den = 0.0, 0.0
    student.eval()
    with torch.no_grad():
        for (kw, mask), ref in zip(measure.batches, measure.ref):
            logq = torch.log_softmax(student(**kw).logits.float(), dim=-1)
            kl = F.kl_div(logq, ref, reduction="none", log_target=True).sum(-1)
            if mask is not None and kl.dim() == 2 and tuple(kl.shape) == tuple(mask.shape):
                w = mask.to(kl.dtype)
                num += float((kl * w).sum())
                den += float(w.sum())
            else:
                num += float(kl.sum())
                den += kl.numel()
    return num / den


def setup_model(name: str, args) -> dict | None:
    """The teacher, its calibration and its quality measure for model `name`; None (with a line on stderr) when its
    files are absent."""
    from common import MINILM, SST2, block_nlls, ensure_minilm_teacher, glue_correct, mcnemar, paired_nll
    from kron import load_model
    from kron.models import load_tokenizer, resolve_source
    from trials.calibration import calibration_batches, calibration_stats
    from trials.data import load_text_blocks

    data = Path(args.data)
    if name in ("demo", "stories"):
        src = resolve_source("demo") if name == "demo" else str(STORIES)
        if name == "stories" and not STORIES.is_dir() or not data.exists():
            print(f"{name}: {STORIES if name == 'stories' else data} not found, skipped", file=sys.stderr)
            return None
        teacher = load_model(src, device="cpu").eval()
        tok = load_tokenizer(src)
        source, seq = str(data), 128
        blocks = load_text_blocks(data, tok, seq, "valid")[: args.eval_blocks]
        quality = lambda m: block_nlls(m, blocks)  # noqa: E731
        summary = _ppl
        paired = paired_nll
        label = f"ppl on {blocks.shape[0]} WikiText-2 valid blocks of {seq}"
    elif name == "minilm":
        if not MINILM.is_dir() or not SST2.is_dir():
            print("minilm: MiniLM or SST-2 not found, skipped", file=sys.stderr)
            return None
        from trials.glue import encode_glue, load_glue

        src = str(ensure_minilm_teacher(args.minilm_teacher))
        teacher = load_model(src, device="cpu").eval()
        tok = load_tokenizer(src)
        source, seq = f"glue:sst2:{SST2}", 64
        dev = encode_glue(load_glue("sst2", str(SST2), "dev"), tok, 64)
        quality = lambda m: glue_correct(m, dev, 64)  # noqa: E731
        summary = lambda ok: 100.0 * float(ok.double().mean())  # noqa: E731
        paired = mcnemar
        label = f"SST-2 dev accuracy (%) on {len(dev['labels'])} sentences"
    else:
        raise SystemExit(f"unknown model {name!r}: demo, minilm or stories")
    stats = calibration_stats(teacher, tok, source, args.calib_tokens, seq_len=seq, model_id=src)
    heldout = calibration_batches(teacher, tok, source, args.calib_tokens, seq_len=seq)[1]
    return {"name": name, "src": src, "teacher": teacher, "stats": stats, "heldout": heldout, "quality": quality,
            "summary": summary, "paired": paired, "label": label, "source": source}


def _uniform_quant(bits: int, config) -> "object":
    from kron.plan import CompressionPlan
    from kron.presets import get_plan

    # every matrix lowrank:2 selects (attention and FFN), quantised instead
    rules = get_plan("lowrank:2", config).to_dict()["rules"]
    return CompressionPlan.from_dict({"name": f"int{bits}", "rules": [
        {**{k: v for k, v in r.items() if k != "lowrank_ratio"}, "quantize": f"int{bits}"} for r in rules]})


def model_rows(m: dict, args) -> tuple[list[dict], dict]:
    """Every row of one model: presets, then per budget the knapsack, +refine and +evo."""
    from kron.autoplan import Budget, Constraints, auto_plan, items_from_profile, parse_budget, resolved_specs
    from kron.evo import evolve_plan
    from kron.plan import CompressionPlan
    from kron.presets import get_plan
    from kron.profile import profile_model
    from kron.refine import PlanEvaluator, plan_choice, refine_plan
    from kron.surgery import compress, count_bytes
    from search.profile_commands import EMBEDDING_FACTORS

    teacher, stats, heldout = m["teacher"], m["stats"], m["heldout"]
    rows: list[dict] = []
    t_q = m["quality"](teacher)
    rows.append({"model": m["name"], "group": "teacher", "plan": "teacher", "ratio": 1.0, "kl": 0.0,
                 "bytes": count_bytes(teacher), "quality": m["summary"](t_q)})
    c = Constraints(max_shapes=args.max_shapes, shapes_per_level=args.shapes_per_level)
    suites = [("ratio", ["kronecker", "lowrank"], [parse_budget(b) for b in args.evo_budgets.split(",") if b])]
    if args.evo_bytes:
        dense_bytes = count_bytes(teacher)
        suites.append(("bytes", ["kronecker", "lowrank", "int8", "int4"],
                       [Budget.on("bytes", dense_bytes / float(f), f"bytes=1/{f}")
                        for f in args.evo_bytes.split(",") if f]))
    info = {"profile_s": {}}
    for suite, methods, budgets in suites:
        t0 = time.time()
        prof = profile_model(teacher, stats, methods=methods, constraints=c, source=m["src"], heldout=heldout,
                             kl_subset=args.kl_subset, kl_tokens=args.kl_tokens, embedding_factors=EMBEDDING_FACTORS)
        info["profile_s"][suite] = round(time.time() - t0, 1)
        ev = PlanEvaluator(teacher, stats, heldout, (None,), prof.get("ridge"))  # all held-out tokens, every plan
        info["heldout_tokens"] = ev.tokens()
        presets = ([f"{k}:{f}" for k in ("lowrank", "uniform") for f in (2, 4, 8)] if suite == "ratio"
                   else ["int8", "int4"])
        for p in presets:
            plan = _uniform_quant(int(p[3:]), teacher.config) if suite == "bytes" else get_plan(p, teacher.config)
            try:
                rep = compress(teacher, plan, init="data", calib=stats, inplace=False)
            except Exception as exc:  # a preset the model's shapes do not allow: say so, go on
                rows.append({"model": m["name"], "group": suite, "plan": p, "error": str(exc).splitlines()[0]})
                continue
            q = m["quality"](rep.model)
            rows.append({"model": m["name"], "group": suite, "budget": "preset", "plan": p,
                         "ratio": rep.compression_ratio, "bytes": count_bytes(rep.model), "kl": _kl(ev.measure,
                                                                                                   rep.model),
                         "quality": m["summary"](q), "vs_teacher": None})
            print(f"  {m['name']} {p}: ratio {rep.compression_ratio:.2f}, KL {rows[-1]['kl']:.4f}, "
                  f"quality {rows[-1]['quality']:.2f}", file=sys.stderr, flush=True)
        for budget in budgets:
            try:
                sol = auto_plan(prof, budget, methods=methods, damage="kl")
            except Exception as exc:  # unreachable: say so, go on
                rows.append({"model": m["name"], "group": suite, "budget": str(budget), "plan": "knapsack",
                             "error": str(exc).splitlines()[0]})
                continue
            items, _ = items_from_profile(prof, budget.axis, methods=methods, damage="kl")
            t = time.time()
            ref = refine_plan(teacher, stats, prof, budget, sol, heldout, methods=methods, damage="kl",
                              max_evals=args.refine or 40)
            ref_s = time.time() - t
            evo = evolve_plan(teacher, stats, prof, budget, sol, heldout, methods=methods, damage="kl",
                              generations=args.evo_generations, offspring=args.evo_offspring, seed=args.evo_seed)
            base = None
            for name, s, cost in (("knapsack", sol, None),
                                  ("+refine", ref.solution, {"evals": ref.evals, "seconds": round(ref_s, 1)}),
                                  ("+evo", evo.solution, {"evals": evo.evals, "tokens": evo.tokens,
                                                          "seconds": round(evo.seconds, 1),
                                                          "generations": evo.generations, "stopped": evo.stopped,
                                                          "workers": evo.workers})):
                kl = ev(plan_choice(items, s))
                rep = compress(teacher, CompressionPlan.from_resolved(resolved_specs(s)), init="data", calib=stats,
                               inplace=False)
                q = m["quality"](rep.model)
                base = q if base is None else base
                rows.append({"model": m["name"], "group": suite, "budget": str(budget), "plan": name,
                             "ratio": rep.compression_ratio, "bytes": count_bytes(rep.model), "kl": kl,
                             "quality": m["summary"](q), "vs_knapsack": None if name == "knapsack" else
                             m["paired"](q, base), "cost": cost})
                print(f"  {m['name']} {budget} {name}: KL {kl:.4f}, quality {rows[-1]['quality']:.2f}",
                      file=sys.stderr, flush=True)
    return rows, info


def _verdict(vs) -> str:
    if not vs:
        return ""
    if "ci_pct" in vs:
        return f"{vs['ppl_change_pct']:+.2f}% [{vs['ci_pct'][0]:+.2f}, {vs['ci_pct'][1]:+.2f}] {vs['verdict']}"
    return f"{vs['change_points']:+.2f} pt ({vs['a_only']}/{vs['b_only']}, p {vs['p']:.2g}) {vs['verdict']}"


def print_table(m: dict, rows: list[dict], info: dict, args) -> None:
    print(f"\n{m['name']} ({m['src']}): KL on {info.get('heldout_tokens', 0):,} held-out calibration tokens of "
          f"{m['source']}, quality = {m['label']}, right after data-aware init (no training); evo "
          f"{args.evo_generations} generations x {args.evo_offspring} offspring (seed {args.evo_seed}), refine at "
          f"most {args.refine or 40} measurements; profiles {info['profile_s']} s")
    print(f"{'group':<6} {'budget':<10} {'plan':<11} {'ratio':>6} {'bytes':>10} {'KL':>8} {'vs knap.':>9} "
          f"{'quality':>9}  {'vs knapsack':<40} cost")
    knap = {}
    for r in rows:
        if r.get("error"):
            print(f"{r['group']:<6} {r.get('budget', ''):<10} {r['plan']:<11} {r['error']}")
            continue
        key = (r["group"], r.get("budget"))
        if r["plan"] == "knapsack":
            knap[key] = r["kl"]
        vs_k = f"{100 * (r['kl'] / knap[key] - 1):+.1f}%" if key in knap and r["plan"] != "knapsack" else ""
        cost = r.get("cost")
        cost = f"{cost['evals']} evals, {cost['seconds']:.0f} s" if cost else ""
        print(f"{r['group']:<6} {r.get('budget', '') or '':<10} {r['plan']:<11} {r['ratio']:>6.2f} "
              f"{r.get('bytes', 0) or 0:>10,} {r['kl']:>8.4f} {vs_k:>9} {r['quality']:>9.2f}  "
              f"{_verdict(r.get('vs_knapsack')):<40} {cost}")


def evo_part(args) -> dict:
    torch.manual_seed(0)
    out = {"generations": args.evo_generations, "offspring": args.evo_offspring, "seed": args.evo_seed,
           "models": {}}
    for name in [n for n in args.evo_models.split(",") if n]:
        m = setup_model(name, args)
        if m is None:
            continue
        rows, info = model_rows(m, args)
        print_table(m, rows, info, args)
        out["models"][name] = {"rows": rows, **info, "quality": m["label"], "teacher": m["src"]}
    return out
