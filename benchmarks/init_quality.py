"""Quality right after initialisation (no distillation): SVD init vs data-aware init, per preset.

Demo teacher (`kron.load_model("demo")`): perplexity on the first blocks of WikiText-2 valid (../shared/data/
wikitext-2, or --data), calibration on 8,192 tokens of its train split (7,168 fit + 1,024 held out; separate from
the evaluation text). For `uniform:<f>` data-aware init is shown with both tie-breaks: output-split (the shapes
svd init uses; the papers') and input-split (the default under --init data). Optionally MiniLM
(../shared/models/all-MiniLM-L6-v2): cosine of the last hidden state to the teacher's on SST-2 dev sentences,
calibrated on SST-2 train sentences.

    python benchmarks/init_quality.py [--threads 1] [--eval-blocks 64] [--calib-tokens 8192] [--minilm]

Prints a table and one JSON line (`{"benchmark": "init_quality", ...}`); the target: data-aware init at least 2x
lower perplexity than SVD init for uniform:4 on the demo teacher.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from common import perplexity  # noqa: E402

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
PRESETS = ("kngpt2", "uniform:2", "uniform:4", "lowrank:2", "lowrank:4")


def demo_rows(args) -> list[dict]:
    from kron import load_model
    from kron.models import load_tokenizer, resolve_source
    from kron.surgery import compress
    from trials.calibration import calibration_stats
    from trials.data import load_text_blocks

    src = resolve_source("demo")
    teacher = load_model(src, device="cpu")
    tok = load_tokenizer(src)
    data = Path(args.data)
    if not data.exists():
        sys.exit(f"WikiText-2 not found at {data}; pass --data DIR")
    blocks = load_text_blocks(data, tok, 128, "valid")[: args.eval_blocks]
    t0 = time.time()
    calib = calibration_stats(teacher, tok, str(data), args.calib_tokens, seq_len=128, model_id="demo")
    calib_s = time.time() - t0
    rows = [{"model": "demo", "preset": "teacher", "init": "-", "split": "-", "quality": perplexity(teacher, blocks),
             "seconds": 0.0}]
    for preset in PRESETS:
        variants = [("svd", "output"), ("data", "output"), ("data", "input")] if preset.startswith("uniform") else \
            [("svd", None), ("data", None)]
        for init, split in variants:
            t = time.time()
            rep = compress(teacher, preset, init=init, calib=calib, split=split, inplace=False)
            secs = time.time() - t
            errs = [r.output_error for r in rep.modules if r.output_error is not None]
            rows.append({"model": "demo", "preset": preset, "init": init, "split": split or "-",
                         "quality": perplexity(rep.model, blocks), "seconds": secs,
                         "mean_output_error": sum(errs) / len(errs) if errs else None,
                         "compression": rep.compression_ratio})
    print(f"demo teacher: calibration {calib.tokens:,} + {calib.heldout_tokens:,} held-out tokens "
          f"({calib_s:.1f} s{', cached' if calib.from_cache else ''}); perplexity on {blocks.shape[0]} blocks of 128")
    return rows


def minilm_rows(args) -> list[dict]:
    from kron import load_model
    from kron.models import load_tokenizer
    from kron.surgery import compress
    from trials.calibration import calibration_stats
    from trials.glue import encode_glue, load_glue

    path = SHARED / "models" / "all-MiniLM-L6-v2"
    glue = SHARED / "data" / "glue"
    if not path.is_dir() or not glue.is_dir():
        print("MiniLM or GLUE data not found: skipping the MiniLM rows")
        return []
    teacher = load_model(str(path), task="base", device="cpu")
    tok = load_tokenizer(str(path))
    dev = encode_glue(load_glue("sst2", str(glue), "dev")[:256], tok, 64)
    inputs = {k: dev[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in dev}
    mask = inputs["attention_mask"].bool()

    def hidden(model):
        with torch.no_grad():
            return model(**inputs).last_hidden_state[mask]

    ref = hidden(teacher)
    calib = calibration_stats(teacher, tok, f"glue:sst2:{glue}", args.calib_tokens, model_id=str(path))
    rows = []
    for preset in ("uniform:2", "uniform:4", "lowrank:2", "lowrank:4"):
        variants = [("svd", "output"), ("data", "input")] if preset.startswith("uniform") else [("svd", None),
                                                                                              ("data", None)]
        for init, split in variants:
            t = time.time()
            rep = compress(teacher, preset, init=init, calib=calib, split=split, inplace=False)
            cos = torch.nn.functional.cosine_similarity(hidden(rep.model), ref, dim=-1).mean().item()
            rows.append({"model": "minilm", "preset": preset, "init": init, "split": split or "-", "quality": cos,
                         "seconds": time.time() - t})
    return rows


def minilm_accuracy_rows(args) -> list[dict]:
    """SST-2 dev accuracy (all 872 sentences) right after init of the fine-tuned MiniLM teacher compressed by each
    preset (svd / data-aware init) and by the automatic plan at each preset's size (profile of the classifier with
    KL of its outputs for 4 candidates per matrix and for every word-embedding factor 2/4/8, summed-KL knapsack at
    the preset's parameter count, data-aware init); calibration on SST-2 training sentences. Two automatic plans per
    size: "auto" may factor the word embedding (the profile's default), "auto-lin" plans the linear matrices only
    (what this benchmark measured before the embedding was profiled; it cannot reach the KroneckerBERT8-style size,
    whose embedding is factored). With --refine N (default 40) a third: "auto+refine", the "auto" plan improved by
    `kron.refine.refine_plan` — exchange moves kept when they lower the whole classifier's KL on the held-out
    calibration sentences (what `plan --auto --refine N` does). Each automatic plan is compared with the preset
    (data-aware init) sentence by sentence: McNemar's exact test on the sentences only one of them gets right
    (`common.mcnemar`), "better"/"worse" at p < 0.05, otherwise "tie"."""
    from common import MINILM, SST2, ensure_minilm_teacher, glue_correct, mcnemar
    from glue_minilm import student_plan
    from kron import load_model
    from kron.autoplan import Budget, Constraints, auto_plan, resolved_specs
    from kron.errors import UserError
    from kron.models import load_tokenizer
    from kron.plan import CompressionPlan
    from kron.profile import profile_model
    from kron.refine import refine_plan
    from kron.surgery import compress
    from trials.calibration import calibration_batches, calibration_stats
    from trials.glue import encode_glue, load_glue

    if not MINILM.is_dir() or not SST2.is_dir():
        print("MiniLM or SST-2 data not found: skipping the MiniLM accuracy rows")
        return []
    tdir = ensure_minilm_teacher(args.minilm_teacher)
    teacher = load_model(str(tdir), device="cpu")
    tok = load_tokenizer(str(tdir))
    dev = encode_glue(load_glue("sst2", str(SST2), "dev"), tok, 64)

    def correct(model):
        return glue_correct(model, dev, 64)

    def accuracy(ok) -> float:  # as trials.evaluate.evaluate_glue reports it: a fraction
        return float(ok.double().mean())

    source = f"glue:sst2:{SST2}"
    calib = calibration_stats(teacher, tok, source, args.calib_tokens, seq_len=64, model_id=str(tdir))
    heldout = calibration_batches(teacher, tok, source, args.calib_tokens, seq_len=64)[1]
    t0 = time.time()
    prof = profile_model(teacher, calib, constraints=Constraints(), source=str(tdir), heldout=heldout, kl_subset=4,
                         kl_tokens=args.kl_tokens, embedding_factors=(2, 4, 8))
    print(f"MiniLM SST-2 teacher: profile of {len(prof['matrices'])} matrices in {time.time() - t0:.1f} s, KL on "
          f"{prof['model_measure']['tokens']} held-out tokens "
          f"(proxy vs KL Spearman {prof['correlation']['spearman']:.3f})")
    rows = [{"model": "minilm-sst2", "preset": "teacher", "init": "-", "split": "-",
             "quality": accuracy(correct(teacher)), "seconds": 0.0}]
    presets = {"uniform:2": "uniform:2", "uniform:4": "uniform:4", "lowrank:2": "lowrank:2",
               "lowrank:4": "lowrank:4", "kroneckerbert8-style": CompressionPlan.from_dict(student_plan())}
    for name, plan in presets.items():
        params = None
        for init in ("svd", "data"):
            t = time.time()
            rep = compress(teacher, plan, init=init, calib=calib, inplace=False)
            params = rep.params_after
            preset_ok = correct(rep.model)  # the data-aware one (last) is what the automatic plans are judged by
            rows.append({"model": "minilm-sst2", "preset": name, "init": init, "split": "-",
                         "quality": accuracy(preset_ok), "seconds": time.time() - t, "params": params})
        budget = Budget.on("params", params, f"params={params}")
        for label, embeddings in (("auto", True), ("auto-lin", False)):
            t = time.time()
            try:
                sol = auto_plan(prof, budget, damage="kl", embeddings=embeddings)
            except UserError as exc:
                rows.append({"model": "minilm-sst2", "preset": f"{label} @ {name}", "init": "data", "split": "-",
                             "quality": float("nan"), "seconds": 0.0, "error": str(exc).splitlines()[0]})
                continue
            rep = compress(teacher, CompressionPlan.from_resolved(resolved_specs(sol)), init="data", calib=calib,
                           inplace=False)
            emb = next((o.label for n, o in sol.choice.items() if "word_embeddings" in n), "keep")
            ok = correct(rep.model)
            rows.append({"model": "minilm-sst2", "preset": f"{label} @ {name}", "init": "data", "split": "-",
                         "quality": accuracy(ok), "seconds": time.time() - t, "params": rep.params_after,
                         "embedding": emb, "vs_preset": mcnemar(ok, preset_ok)})
            if label == "auto" and args.refine:  # plan --auto --refine: exchange moves judged by the whole model's KL
                t = time.time()
                ref = refine_plan(teacher, calib, prof, budget, sol, heldout, damage="kl", max_evals=args.refine,
                                  kl_tokens=args.kl_tokens, embeddings=True)
                rep = compress(teacher, CompressionPlan.from_resolved(resolved_specs(ref.solution)), init="data",
                               calib=calib, inplace=False)
                ok = correct(rep.model)
                rows.append({"model": "minilm-sst2", "preset": f"auto+refine @ {name}", "init": "data",
                             "split": "-", "quality": accuracy(ok), "vs_preset": mcnemar(ok, preset_ok),
                             "seconds": time.time() - t,
                             "params": rep.params_after, "kl_start": ref.start_kl, "kl_end": ref.kl,
                             "moves": len(ref.moves), "evals": ref.evals})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-blocks", type=int, default=64)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--data", default=str(SHARED / "data" / "wikitext-2"))
    p.add_argument("--minilm", action="store_true", help="also the MiniLM rows (cosine to the teacher on SST-2 dev, "
                   "and SST-2 dev accuracy of the fine-tuned teacher after init, presets and automatic plans)")
    p.add_argument("--minilm-teacher", default="runs/minilm-sst2-teacher",
                   help="the SST-2 fine-tuned MiniLM (made there first when absent: common.ensure_minilm_teacher)")
    p.add_argument("--skip-demo", action="store_true", help="only the MiniLM rows")
    p.add_argument("--refine", type=int, default=40, metavar="N",
                   help="MiniLM accuracy rows: also the automatic plan refined on the whole classifier's KL "
                        "(plan --auto --refine N: at most N measurements; 0: no refined rows)")
    p.add_argument("--kl-tokens", type=int, default=1024,
                   help="held-out calibration tokens of the MiniLM classifier's KL in its profile (1/8 of "
                        "--calib-tokens are held out; default 1024, the profile CLI's default)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    rows = [] if args.skip_demo else demo_rows(args)
    if args.minilm:
        rows += minilm_rows(args)
        rows += minilm_accuracy_rows(args)
    print(f"{'model':<7} {'preset':<10} {'init':<5} {'split':<7} {'quality':>9} {'out_err':>8} {'init s':>7}")
    for r in rows:
        if r.get("error"):
            print(f"{r['model']:<7} {r['preset']:<10} {r['error']}")
            continue
        q = f"{r['quality']:.1f}" if r["model"] == "demo" else f"{r['quality']:.3f}"
        oe = "-" if r.get("mean_output_error") is None else f"{r['mean_output_error']:.3f}"
        vs = r.get("vs_preset")
        vs = (f"  vs preset {vs['change_points']:+.1f} points ({vs['a_only']} vs {vs['b_only']} sentences, McNemar "
              f"p {vs['p']:.3f}): {vs['verdict']}" if vs else "")
        print(f"{r['model']:<7} {r['preset']:<10} {r['init']:<5} {r['split']:<7} {q:>9} {oe:>8} "
              f"{r['seconds']:>7.1f}{vs}")
    q = {(r["preset"], r["init"], r["split"]): r["quality"] for r in rows if r["model"] == "demo"}
    if not q:
        print(json.dumps({"benchmark": "init_quality", "threads": args.threads,
                          "seconds": round(time.time() - t0, 1), "rows": rows}))
        return 0
    ratio = q[("uniform:4", "svd", "output")] / q[("uniform:4", "data", "input")]
    print(f"uniform:4 on the demo teacher: SVD init perplexity / data-aware init perplexity = {ratio:.2f} "
          f"(target >= 2): {'met' if ratio >= 2 else 'NOT met'}")
    print(json.dumps({"benchmark": "init_quality", "threads": args.threads, "seconds": round(time.time() - t0, 1),
                      "uniform4_ppl_ratio": round(ratio, 3), "target_met": ratio >= 2, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
