"""`kronsearch shapes | plan | compress | merge`: factor shapes, plans, one-shot compression, merging back.

Model sources (--model): a local model directory, a hub name, config:gpt2 / config:bert-base-uncased /
config:PATH (random weights), or `demo` (the small GPT-2 bundled with kronsearch).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from analysis.textfmt import text_table

from .profile_commands import (add_auto_arguments, add_profile_parser, add_ridge_arg, calibration_stats_for,
                               check_manual_plan, plan_auto)

_SRC_HELP = ("model: a local model directory, a hub name, 'demo' (the bundled GPT-2), or config:gpt2 / "
             "config:bert-base-uncased / config:PATH/config.json (random weights)")


def add_parsers(subparsers) -> None:
    from kron.presets import PRESETS

    presets = "; ".join(f"{k}: {v}" for k, v in PRESETS.items())

    p = subparsers.add_parser(
        "shapes", help="list the valid Kronecker factor shapes of an M x N (out x in) weight",
        description="Every split W (M x N) = A (m1 x n1) ⊗ B (m2 x n2), largest first, with its parameters, "
                    "compression, multiply-adds per token and the cheaper contraction order.")
    p.add_argument("m", type=int, metavar="M", help="rows of the weight (out features)")
    p.add_argument("n", type=int, metavar="N", help="columns of the weight (in features)")
    p.add_argument("--rank", type=int, default=1, help="number of summed Kronecker products (default 1)")
    p.add_argument("--min-compression", type=float, default=None, help="keep shapes compressing at least this much")
    p.add_argument("--max-compression", type=float, default=None, help="keep shapes compressing at most this much")
    p.add_argument("--max-aspect", type=float, default=None,
                   help="keep shapes whose A and B have max(rows, cols)/min(rows, cols) <= this")
    p.add_argument("--limit", type=int, default=None, help="show at most this many shapes")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=_shapes)

    p = subparsers.add_parser(
        "plan", help="resolve a preset or plan file against a model and show what it would do (no SVD, no weights)",
        description="Builds the model's structure on the meta device (no weights are loaded), applies the plan "
                    f"and prints the replaced modules and the counts. Presets: {presets}")
    p.add_argument("--model", required=True, help=_SRC_HELP)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", help="a preset name (kngpt2, kroneckerbert8, ..., uniform:<factor>, lowrank:<factor>)")
    g.add_argument("--plan", help="a plan file (.yaml/.json) or a preset name")
    p.add_argument("--task", default="auto", help="auto, causal-lm, sequence-classification or base")
    p.add_argument("--out", help="write the plan (with its concrete shapes) to this .yaml/.json file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_plan_command)
    add_auto_arguments(p, g)  # plan --auto --budget ... (search.profile_commands)

    p = subparsers.add_parser(
        "compress", help="compress a model with a plan (SVD or data-aware initialisation) and save it",
        description=f"Loads the model, factors the selected weights (by SVD, or with --init data --calib SRC by "
                    f"minimising the output error on calibration inputs) and saves the compressed model. "
                    f"Presets: {presets}")
    p.add_argument("--model", required=True, help=_SRC_HELP)
    p.add_argument("--plan", required=True, help="a plan file (.yaml/.json) or a preset name")
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds an earlier kronsearch checkpoint (and nothing else: files "
                        "kronsearch did not write are never deleted)")
    p.add_argument("--task", default="auto", help="auto, causal-lm, sequence-classification or base")
    p.add_argument("--num-labels", type=int, default=None, help="labels of a sequence-classification head")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=None, help="float32 (default: the checkpoint's), bfloat16, float16, float64")
    p.add_argument("--init", choices=("svd", "data"), default="svd",
                   help="svd: nearest Kronecker product / truncated SVD of each weight (default); data: minimise the "
                        "output error on calibration inputs (activation-aware; whitened SVD for low-rank), needs "
                        "--calib")
    p.add_argument("--calib", default=None, metavar="SRC",
                   help="calibration data: a text file or folder, a datasets-hub name, glue:<task>[:DIR] or "
                        "teacher-samples; with --init svd it only adds each module's output error to the report")
    p.add_argument("--calib-config", default=None, metavar="NAME", help="hub config name of --calib")
    p.add_argument("--calib-tokens", type=int, default=None, metavar="N",
                   help="calibration token budget (default 8192; 1/8 is held out for the report's output error)")
    p.add_argument("--calib-seq-len", type=int, default=128, metavar="L", help="calibration block length")
    add_ridge_arg(p)  # --ridge (search.profile_commands)
    p.add_argument("--split", choices=("auto", "output", "input"), default="auto",
                   help="side that factor rules and uniform:<f> split among equally compressing shapes: output (the "
                        "papers' tie-break), input (what data-aware init serves best); auto: input with --init data")
    p.add_argument("--sequential", action="store_true",
                   help="with --init data: one transformer layer at a time (kron.sequential): the weights read from "
                        "the model folder's safetensors as each layer needs them, its statistics collected on its "
                        "inputs, the layer compressed — for models whose whole-model calibration does not fit")
    p.add_argument("--feed", choices=("teacher", "compressed"), default=None,
                   help="with --sequential: the next layer's inputs are the teacher layer's outputs (default; the "
                        "same result as without --sequential) or the compressed layer's (each layer fitted to the "
                        "inputs it will see, as SparseGPT/GPTQ do)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the report) instead of a table")
    p.set_defaults(func=_compress)

    p = subparsers.add_parser(
        "merge", help="turn a compressed model back into a plain dense transformers model directory",
        description="Multiplies the Kronecker factors out (W = Σ A_k ⊗ B_k) and writes a directory that "
                    "transformers' from_pretrained loads without kronsearch.")
    p.add_argument("dir", help="a directory written by `kronsearch compress`")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_merge)

    add_profile_parser(subparsers)  # kronsearch profile (search.profile_commands)


# ----------------------------------------------------------------------------------------------- shapes


def _shapes(args) -> int:
    from kron.errors import ShapeError
    from kron.factor import factor_shapes

    if args.m < 1 or args.n < 1:
        raise ShapeError(f"M and N must be positive integers (the weight's out and in sizes), got {args.m} x {args.n}")
    if args.rank < 1:
        raise ShapeError(f"--rank must be a positive integer, got {args.rank}")
    if args.limit is not None and args.limit < 1:
        raise ShapeError(f"--limit must be a positive integer, got {args.limit}")
    rows = factor_shapes(args.m, args.n, rank=args.rank, min_compression=args.min_compression,
                         max_compression=args.max_compression, max_aspect=args.max_aspect)
    total = len(rows)
    if args.limit is not None:
        rows = rows[: args.limit]
    if args.json:
        print(json.dumps([r.to_dict() for r in rows]))
        return 0
    header = ("m1", "n1", "m2", "n2", "rank", "params", "compression", "macs/token", "mac-reduction", "order")
    table = [(r.m1, r.n1, r.m2, r.n2, r.rank, f"{r.params:,}", f"{r.compression:.2f}x", f"{r.macs_per_token:,}",
              f"{r.mac_reduction:.2f}x", r.order) for r in rows]
    print(f"{args.m} x {args.n} weight (out x in): {args.m * args.n:,} parameters, {args.m * args.n:,} multiply-adds "
          f"per token dense")
    print_table(header, table)
    shown = f"{len(rows)} of {total}" if len(rows) < total else f"{total}"
    print(f"{shown} shapes (rank {args.rank}; trivial 1x1 factors omitted)")
    return 0


def print_table(header, rows, indent: str = "") -> None:
    """Columns right-aligned to their widest cell, no rule, each line prefixed by `indent`
    (`analysis.textfmt.text_table`)."""
    print(text_table(header, rows, rule=False, indent=indent))


# ----------------------------------------------------------------------------------------------- plan


def _plan_command(args) -> int:
    """`kronsearch plan`: an automatic plan with --auto (search.profile_commands), else the preset or plan file."""
    if getattr(args, "auto", False):
        return plan_auto(args)
    check_manual_plan(args)
    return _plan(args)


def _plan(args) -> int:
    from kron.models import build_from_config, load_config
    from kron.plan import KEEP
    from kron.models import resolve_source
    from kron.presets import get_plan, preset_plan
    from kron.surgery import apply_specs

    src = resolve_source(args.model)
    config = load_config(src)
    model = build_from_config(config, task=args.task, device="meta")
    plan = preset_plan(args.preset, config) if args.preset is not None else get_plan(args.plan, config)
    resolved = plan.resolve(model)
    report = apply_specs(model, resolved, init="none")
    if args.out:
        plan.save(args.out)
    kept = sum(1 for s in resolved.values() if s == KEEP)
    if args.json:
        out = {"model": args.model, "plan": plan.to_dict(),
               "modules": {n: s.to_dict() for n, s in resolved.items() if s != KEEP}, "kept_dense": kept,
               "report": report.to_dict()}
        if args.out:
            out["plan_file"] = str(args.out)
        print(json.dumps(out))
        return 0
    print(f"plan {plan.name or args.plan!s} on {args.model} ({type(model).__name__}): "
          f"{len(report.modules)} modules factored, {kept} linear/embedding modules kept dense")
    print(report.summary(max_modules=None))
    if args.out:
        print(f"plan written to {args.out}")
    return 0


def _check_out(out: str, overwrite: bool) -> Path:
    """`--out` of compress and merge: a new or empty folder, or any folder with --overwrite (whose writer then
    still refuses files it did not write: `kron.fsutil.atomic_dir`)."""
    from kron.errors import CheckpointError

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"output {out} exists and is not empty; choose another --out or pass --overwrite")
    return out


# ----------------------------------------------------------------------------------------------- compress


def _compress(args) -> int:
    from kron.io import save_compressed
    from kron.models import load_model
    from kron.presets import get_plan
    from kron.models import resolve_source
    from kron.surgery import compress

    from kron.errors import ConfigError

    if args.init == "data" and args.calib is None:
        raise ConfigError("--init data needs calibration data: --calib SRC (a text file or folder, a hub dataset, "
                          "glue:<task>[:DIR] or teacher-samples)")
    if args.calib is None and (args.calib_tokens is not None or args.calib_config is not None):
        raise ConfigError("--calib-tokens and --calib-config describe --calib; give --calib SRC")
    if args.ridge is not None and args.init != "data":
        raise ConfigError("--ridge is the data-aware init's; give --init data (and --calib)")
    if args.feed is not None and not args.sequential:
        raise ConfigError("--feed goes with --sequential")
    _check_out(args.out, args.overwrite)
    src = resolve_source(args.model)
    split = None if args.split == "auto" else args.split
    if args.sequential:
        model, plan, report, calib = _compress_sequential(args, src, split)
    else:
        model = load_model(src, task=args.task, num_labels=args.num_labels, device=args.device, dtype=args.dtype)
        plan = get_plan(args.plan, model.config)
        calib = None
        if args.calib is not None:
            calib = calibration_stats_for(args, model, src)
        report = compress(model, plan, init=args.init, calib=calib, split=split, ridge=args.ridge)
    tok = src if Path(src).is_dir() else None
    out = save_compressed(model, plan, args.out, report=report, tokenizer_dir=tok)
    if args.json:
        d = report.to_dict()
        d["init_errors"] = report.init_errors()
        if calib is not None:
            d["output_errors"] = report.output_errors()
        d["out"] = str(out)
        d["plan"] = plan.to_dict()
        print(json.dumps(d))
        return 0
    print(report.summary())
    print(f"saved to {out}")
    return 0


def _compress_sequential(args, src: str, split):
    """`compress --sequential`: (model, plan, report, calibration info) by `kron.sequential.sequential_compress`."""
    from kron.errors import ConfigError
    from kron.models import load_tokenizer, pick_device
    from kron.presets import get_plan
    from kron.sequential import LazyModel, sequential_compress
    from trials.calibration import DEFAULT_CALIB_TOKENS, calibration_batches

    if args.init != "data":
        raise ConfigError("--sequential compresses with the data-aware init, layer by layer: give --init data and "
                          "--calib SRC")
    if args.calib == "teacher-samples":
        raise ConfigError("--sequential cannot sample text from a model it never holds whole: give --calib a text "
                          "file or folder, a hub dataset or glue:<task>[:DIR]")
    if args.num_labels is not None:
        raise ConfigError("--sequential keeps the checkpoint's head: --num-labels is for the whole-model path")
    tokens = DEFAULT_CALIB_TOKENS if args.calib_tokens is None else args.calib_tokens
    if tokens < 1 or args.calib_seq_len < 2:
        raise ConfigError(f"--calib-tokens must be >= 1 and --calib-seq-len >= 2, got {tokens} and "
                          f"{args.calib_seq_len}")
    lazy = LazyModel.open(src, task=args.task, device=pick_device(args.device), dtype=args.dtype)
    plan = get_plan(args.plan, lazy.model.config)
    fit, held = calibration_batches(lazy.model, load_tokenizer(src), args.calib, tokens, seq_len=args.calib_seq_len,
                                    config_name=args.calib_config)

    def bar(done, total):
        if not args.json:
            print(f"  layer {done}/{total} compressed", file=sys.stderr, flush=True)

    model, report = sequential_compress(lazy, plan, fit, heldout=held, init="data", feed=args.feed or "teacher",
                                        ridge=args.ridge, split=split, progress=bar)
    return model, plan, report, report.calib


# ----------------------------------------------------------------------------------------------- merge


def _merge(args) -> int:
    from kron.fsutil import atomic_dir
    from kron.io import TOKENIZER_FILES, load_compressed, merge, model_folder_file
    from kron.surgery import count_params

    out = _check_out(args.out, args.overwrite)
    model = load_compressed(args.dir, device="cpu")
    merge(model)
    with atomic_dir(out, create=False, owned=model_folder_file) as tmp:
        model.save_pretrained(str(tmp))
        for name in TOKENIZER_FILES:
            f = Path(args.dir) / name
            if f.is_file() and not (tmp / name).exists():
                shutil.copy2(f, tmp / name)
    n = count_params(model)
    if args.json:
        print(json.dumps({"out": str(out), "model_class": type(model).__name__, "params": n}))
    else:
        print(f"merged {args.dir} into a dense {type(model).__name__} ({n:,} parameters): {out}")
    return 0
