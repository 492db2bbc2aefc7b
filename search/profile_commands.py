"""`kronsearch profile` and `kronsearch plan --auto`: sensitivity profiles and automatic plans under a budget.

Registered from `search.model_commands` (it calls `add_profile_parser`, `add_auto_arguments`, `add_ridge_arg`);
the work is in `kron.profile` (damage per matrix and candidate) and `kron.autoplan` (the multiple-choice knapsack);
the searches on the model that improve a plan (`--refine`, `--search evo`) are wired in `search.evo_commands`.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from analysis.textfmt import human, text_table

from .evo_commands import add_search_arguments, check_search_args, model_search, per_budget_path, search_record, \
    search_text

_SRC_HELP = ("model: a local model directory, a hub name, 'demo' (the bundled GPT-2), or config:gpt2 / "
             "config:bert-base-uncased / config:PATH/config.json (random weights)")
_CALIB_HELP = ("calibration data: a text file or folder, a datasets-hub name, glue:<task>[:DIR] or teacher-samples "
               "(1/8 of --calib-tokens is held out for the model-level measure)")


KL_POINTS = 4  # candidates per matrix measured at model level: the profile's default, and plan --auto --calib's
EMBEDDING_FACTORS = (2, 4, 8)  # the word embedding's factors profiled by default (the search space's default too)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _add_calib_args(p, required: bool) -> None:
    p.add_argument("--calib", default=None, required=required, metavar="SRC", help=_CALIB_HELP)
    p.add_argument("--calib-config", default=None, metavar="NAME", help="hub config name of --calib")
    p.add_argument("--calib-tokens", type=int, default=None, metavar="N",
                   help="calibration token budget (default 8192; 1/8 held out)")
    p.add_argument("--calib-seq-len", type=int, default=128, metavar="L", help="calibration block length")
    add_ridge_arg(p)


def add_ridge_arg(p) -> None:
    """`--ridge R`, the data-aware init's ridge (profile, plan --auto and compress share it)."""
    p.add_argument("--ridge", type=_ridge, default=None, metavar="R",
                   help="the data-aware init's ridge: λ = ridge · mean(diag S) is added to S (default 0.01); "
                        "larger stays nearer the weight's own SVD, 0 trusts the calibration data fully")


def _ridge(text: str) -> float:
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"the ridge must be a finite number >= 0, got {text}")
    return value


def _add_constraint_args(p, defaults: bool) -> None:
    from kron.autoplan import Constraints

    d = Constraints() if defaults else None

    def dflt(name):
        return getattr(d, name) if d is not None else None

    p.add_argument("--methods", default=None, metavar="M1,M2",
                   help="compression methods whose candidates are profiled (default kronecker,lowrank); a modifier "
                        "(int8, int4, quant) adds every candidate and the dense matrix in its widths")
    p.add_argument("--method-option", action="append", default=None, metavar="METHOD.KEY=VALUE",
                   help="one of a method's own options, e.g. kronecker.ranks=1,2, quant.bits=8,4, quant.group_size=64 "
                        "(repeatable; the options each method takes: its options in the docs' methods page)")
    p.add_argument("--ranks", default=None, metavar="R1,R2",
                   help=f"Kronecker ranks (summed products) to offer (default {','.join(map(str, Constraints().ranks))})")
    p.add_argument("--min-compression", type=float, default=dflt("min_compression"),
                   help=f"smallest compression per matrix and candidate (default {Constraints().min_compression})")
    p.add_argument("--max-compression", type=float, default=dflt("max_compression"),
                   help=f"largest compression per matrix and candidate (default {Constraints().max_compression})")
    p.add_argument("--max-aspect", type=float, default=None, help="largest rows/cols ratio of A and B")
    p.add_argument("--max-shapes", type=int, default=dflt("max_shapes"),
                   help=f"compression levels per method and matrix, spread over log-compression (default "
                        f"{Constraints().max_shapes})")
    p.add_argument("--shapes-per-level", type=int, default=dflt("shapes_per_level"),
                   help=f"Kronecker shapes per compression level: input-side splits first (default "
                        f"{Constraints().shapes_per_level})")
    p.add_argument("--embedding-factors", default=None, metavar="F1,F2|none",
                   help="also profile (and plan) the word embedding as A (v x d/f) ⊗ B (1 x f) for these f, data-free "
                        "init, every factor measured at model level (default "
                        f"{','.join(map(str, EMBEDDING_FACTORS))}; none: leave the embedding as it is; plan --auto "
                        "--profile: default whatever the profile holds)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is fastest on a busy shared machine)")


def add_profile_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "profile", help="damage of compressing each matrix alone, per candidate, with data-aware init",
        description="For every attention and FFN matrix and every candidate (Kronecker shapes x ranks, low-rank "
                    "ranks, keep), the relative output error tr((W-Ŵ)S(W-Ŵ)ᵀ)/tr(WSWᵀ) after data-aware init on "
                    "calibration data, and for a subset the model-level KL to the teacher on held-out tokens (with "
                    "the rank correlation of the two). Written to --out after each matrix; rerunning resumes.")
    p.add_argument("--model", required=True, help=_SRC_HELP)
    _add_calib_args(p, required=True)
    p.add_argument("--out", required=True, help="the profile (.json), resumed when it exists")
    _add_constraint_args(p, defaults=True)
    p.add_argument("--kl-subset", type=int, default=KL_POINTS, metavar="N",
                   help=f"candidates per matrix also measured at model level (KL on held-out tokens; 0: none; "
                        f"default {KL_POINTS}, what `plan --auto --damage kl` needs)")
    p.add_argument("--kl-tokens", type=int, default=1024, metavar="N", help="held-out tokens for the KL")
    p.add_argument("--heatmap", default=None, metavar="PNG",
                   help="heat map of matrix x compression -> damage (default: --out with .png; 'none' to skip)")
    p.add_argument("--fresh", action="store_true", help="recompute instead of resuming (overwrites --out)")
    p.add_argument("--task", default="auto", help="auto, causal-lm, sequence-classification or base")
    p.add_argument("--num-labels", type=int, default=None, help="labels of a sequence-classification head")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:N")
    p.add_argument("--dtype", default=None, help="float32 (default: the checkpoint's), float64")
    p.add_argument("--quiet", action="store_true", help="no per-matrix tables (the summary only)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the summary) instead of tables")
    p.set_defaults(func=profile_command)


def add_auto_arguments(p, group) -> None:
    """`kronsearch plan --auto --budget ...`: the options added to the `plan` subcommand."""
    group.add_argument("--auto", action="store_true",
                       help="choose per matrix the candidate minimising the summed profile damage under --budget")
    p.add_argument("--budget", default=None, metavar="AXIS=V",
                   help="with --auto: params=3.5M (all parameters), params_excl=2M (excluding the output embedding), "
                        "macs=2.1G (multiply-adds per token), bytes=1.2M (weight storage) or ratio=2 (parameters "
                        "excl. the output embedding, teacher/student)")
    p.add_argument("--budgets", default=None, metavar="B1,B2",
                   help="with --auto: several budgets at once (a front of plans), e.g. ratio=1.5,ratio=2,ratio=3")
    p.add_argument("--profile", default=None, metavar="JSON",
                   help="with --auto: a profile from `kronsearch profile` (with --calib: made or resumed there)")
    _add_calib_args(p, required=False)
    _add_constraint_args(p, defaults=False)
    p.add_argument("--damage", choices=("proxy", "kl"), default=None,
                   help="with --auto: what the plan minimises summed over matrices: kl (the model-level KL the "
                        "profile measured for --kl-subset candidates per matrix, interpolated in log-log along the "
                        "proxy for the others; with --calib the profile measures 4 per matrix) or proxy (the "
                        "relative output error of each matrix). Default: kl, or proxy with a note when the profile "
                        "has no model-level measurement for some matrix (made with --kl-subset 0)")
    p.add_argument("--solver", choices=("dp", "lagrange"), default="dp",
                   help="with --auto: dp (exact, or within the stated gap on a rounded cost grid; default) or "
                        "lagrange (multiplier sweep and greedy fill)")
    add_search_arguments(p)  # --refine N, --search evo (search.evo_commands)


# ----------------------------------------------------------------------------------------------- helpers


class _Bar:
    """A one-line progress bar on stderr (a plain line per step when stderr is not a terminal)."""

    def __init__(self, what: str, stream=None):
        self.what, self.stream, self.t0 = what, stream or sys.stderr, time.time()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, done: int, total: int, name: str) -> None:
        el = time.time() - self.t0
        eta = el / done * (total - done) if done else 0
        fill = int(20 * done / max(total, 1))
        line = (f"{self.what} [{'#' * fill}{'.' * (20 - fill)}] {done}/{total} {name} "
                f"({el:.0f}s, eta {eta:.0f}s)")
        if self.tty:
            print("\r" + line.ljust(100), end="\n" if done == total else "", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)


def _constraints(args, base=None):
    """The candidates' settings: `base` (a profile's) or the defaults, with the span flags, Kronecker's --ranks and
    --max-aspect, every --method-option METHOD.KEY=VALUE, and the options the --methods aliases imply (int4)."""
    from kron.autoplan import Constraints
    from kron.errors import ConfigError, PlanError
    from kron.methods import get_method
    from kron.profile import method_names

    d = (base or Constraints()).to_dict()
    opts = d["options"]
    if args.ranks is not None:
        try:
            opts.setdefault("kronecker", {})["ranks"] = [int(r) for r in _csv(args.ranks)]
        except ValueError:
            raise ConfigError(f"--ranks must be integers separated by commas, got {args.ranks!r}") from None
    if args.max_aspect is not None:
        opts.setdefault("kronecker", {})["max_aspect"] = args.max_aspect
    for item in getattr(args, "method_option", None) or []:
        name, key, value = _method_option(item)
        opts.setdefault(get_method(name).name, {})[key] = value
    if args.methods is not None:
        for name, implied in method_names(_csv(args.methods))[1].items():
            opts[name] = {**implied, **opts.get(name, {})}
    for k in ("min_compression", "max_compression", "max_shapes", "shapes_per_level"):
        v = getattr(args, k)
        if v is not None:
            d[k] = v
    try:
        return Constraints.from_dict(d)
    except PlanError as exc:
        raise ConfigError(str(exc)) from None


def _method_option(text: str):
    """(method, key, value) of "METHOD.KEY=VALUE" (VALUE read as YAML; "a,b" as a list)."""
    import yaml

    from kron.errors import ConfigError

    name, _, rest = str(text).partition(".")
    key, eq, value = rest.partition("=")
    if not (name and key and eq):
        raise ConfigError(f"--method-option takes METHOD.KEY=VALUE (e.g. kronecker.ranks=1,2 or quant.bits=8,4), "
                          f"got {text!r}")
    try:
        parsed = [yaml.safe_load(v) for v in value.split(",")] if "," in value and not value.lstrip().startswith(
            "[") else yaml.safe_load(value)
    except yaml.YAMLError:
        raise ConfigError(f"--method-option {text!r}: {value!r} is not a value") from None
    return name.strip(), key.strip(), parsed


def _embedding_factors(args) -> list[int] | None:
    """--embedding-factors as a list ([] for none), or None when not given."""
    from kron.errors import ConfigError

    text = getattr(args, "embedding_factors", None)
    if text is None:
        return None
    if text.strip().lower() == "none":
        return []
    try:
        out = [int(f) for f in _csv(text)]
    except ValueError:
        out = []
    if not out or any(f < 2 for f in out):
        raise ConfigError(f"--embedding-factors takes integers > 1 separated by commas, or none; got {text!r}")
    return out


def _methods(args, default=None) -> list[str]:
    """The registered names of --methods (aliases such as int4 resolved; their options come via `_constraints`),
    or `default`."""
    from kron.autoplan import DEFAULT_METHODS
    from kron.profile import method_names

    return method_names(_csv(args.methods) if args.methods is not None else list(default or DEFAULT_METHODS))[0]


def _load(args):
    from kron.errors import ConfigError
    from kron.models import load_model, resolve_source

    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be a positive integer, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)

    src = resolve_source(args.model)
    model = load_model(src, task=args.task, num_labels=getattr(args, "num_labels", None),
                       device=getattr(args, "device", "cpu"), dtype=getattr(args, "dtype", None))
    return src, model


def _heldout(args, model, src):
    """The held-out calibration batches (the same split `trials.calibration` holds out)."""
    from trials.calibration import DEFAULT_CALIB_TOKENS, calibration_batches

    from kron.models import load_tokenizer

    tokens = DEFAULT_CALIB_TOKENS if args.calib_tokens is None else args.calib_tokens
    return calibration_batches(model, load_tokenizer(src), args.calib, tokens, seq_len=args.calib_seq_len,
                               config_name=args.calib_config)[1]


def _run_profile(args, model, src, path, constraints, methods, kl_subset, kl_tokens, fresh, quiet):
    from kron.profile import profile_model

    stats = calibration_stats_for(args, model, src)
    heldout = _heldout(args, model, src) if kl_subset > 0 else None
    bar = None if quiet else _Bar("profile")
    factors = _embedding_factors(args)
    return profile_model(model, stats, methods=methods, constraints=constraints, source=args.model,
                         heldout=heldout, kl_subset=kl_subset, kl_tokens=kl_tokens, path=path, fresh=fresh,
                         progress=bar, ridge=getattr(args, "ridge", None),
                         embedding_factors=EMBEDDING_FACTORS if factors is None else factors)


def _print_table(header, rows) -> None:
    print(text_table(header, rows, rule=False, indent="  "))


# ----------------------------------------------------------------------------------------------- profile


def profile_command(args) -> int:
    from kron.errors import ConfigError
    from kron.profile import matrix_table

    if args.kl_subset < 0 or args.kl_tokens < 1:
        raise ConfigError("--kl-subset must be >= 0 and --kl-tokens >= 1")
    constraints = _constraints(args)
    methods = _methods(args)
    src, model = _load(args)
    profile = _run_profile(args, model, src, args.out, constraints, methods, args.kl_subset, args.kl_tokens,
                           args.fresh, args.json)
    png = None
    if (args.heatmap or "").lower() != "none":
        png = args.heatmap or str(Path(args.out).with_suffix(".png"))
        try:
            from analysis.profile_plot import profile_heatmap
        except ImportError as exc:
            print(f"kronsearch profile: no heat map ({exc})", file=sys.stderr)
            png = None
        else:
            profile_heatmap(profile, png)
    corr = profile.get("correlation", {})
    n_cand = sum(len(mx["candidates"]) for mx in profile["matrices"].values())
    if args.json:
        print(json.dumps({"out": str(args.out), "heatmap": png, "matrices": len(profile["matrices"]),
                          "candidates": n_cand, "correlation": corr, "model_measure": profile.get("model_measure"),
                          "seconds": profile.get("seconds")}))
        return 0
    if not args.quiet:
        for name, mx in profile["matrices"].items():
            blocks = f", {mx['blocks']} blocks" if mx["blocks"] > 1 else ""
            print(f"{name} ({mx['group']}, {mx['m']} x {mx['n']}{blocks})")
            _print_table(*matrix_table(mx))
    mm = profile.get("model_measure") or {}
    rho = corr.get("spearman")
    print(f"profile of {args.model}: {len(profile['matrices'])} matrices, {n_cand} candidates "
          f"({', '.join(methods)} + keep), damage = relative output error after data-aware init")
    if corr.get("pairs"):
        print(f"proxy vs model-level {mm.get('kind', 'measure')} on {mm.get('tokens', 0)} held-out tokens: Spearman "
              f"{'n/a' if rho is None else f'{rho:.3f}'} over {corr['pairs']} candidates")
    print(f"written to {args.out}" + (f"; heat map {png}" if png else ""))
    return 0


# ----------------------------------------------------------------------------------------------- plan --auto


def check_manual_plan(args) -> None:
    """ConfigError when options of `plan --auto` come without --auto (with --preset/--plan)."""
    from kron.errors import ConfigError

    given = [f"--{k.replace('_', '-')}" for k in ("budget", "budgets", "profile", "calib", "methods", "ranks",
                                                   "embedding_factors", "method_option", "search", "generations",
                                                   "offspring", "evo_state", "evo_tokens", "time_budget_s")
             if getattr(args, k, None) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} {'goes' if len(given) == 1 else 'go'} with --auto (an automatic plan "
                          "under a budget); with --preset/--plan leave them out")


def _budgets(args):
    from kron.autoplan import parse_budget
    from kron.errors import ConfigError

    texts = []
    if args.budget is not None:
        texts.append(args.budget)
    if args.budgets is not None:
        items = [t.strip() for t in str(args.budgets).split(",")]
        empty = [i for i, t in enumerate(items, 1) if not t]
        if empty:
            raise ConfigError(f"--budgets {args.budgets!r}: item {empty[0]} is empty; give AXIS=VALUE items separated "
                              "by single commas (e.g. ratio=1.5,ratio=2)")
        texts += items
    if not texts:
        raise ConfigError("--auto needs --budget AXIS=VALUE (params=3.5M, macs=2.1G, bytes=1.2M, params_excl=2M or "
                          "ratio=2) or --budgets")
    return [parse_budget(t) for t in texts]


_DAMAGE_WORDS = {"proxy": "sum of relative output errors", "kl": "sum of model-level KLs, measured or interpolated"}


def plan_auto(args) -> int:
    from kron.autoplan import auto_plan, items_from_profile, resolved_specs
    from kron.errors import ConfigError
    from kron.models import build_from_config, load_config, resolve_source
    from kron.plan import CompressionPlan
    from kron.autoplan import Constraints
    from kron.profile import check_header, check_matrices, load_profile, model_identity
    from kron.surgery import apply_specs

    budgets = _budgets(args)
    on_model = check_search_args(args)  # --refine / --search evo: their values, before any work
    if args.profile is None and args.calib is None:
        raise ConfigError("--auto needs a profile: --profile profile.json (from `kronsearch profile`) or --calib "
                          "SRC to make one now")
    src = resolve_source(args.model)
    config = load_config(src)
    skeleton = build_from_config(config, task=args.task, device="meta")
    model = None
    if args.calib is not None:
        methods = _methods(args)
        constraints = _constraints(args)
        _, model = _load(args)
        kl = (KL_POINTS, 1024) if args.damage != "proxy" else (0, 1)
        profile = _run_profile(args, model, src, args.profile, constraints, methods, *kl, False, args.json)
        if not on_model:
            model = None
    else:
        profile = load_profile(args.profile)
        base = Constraints.from_dict(profile.get("constraints", {}))
        want = {"model": model_identity(skeleton, args.model, weights_dir=src),  # the weights' fingerprint too
                "constraints": _constraints(args, base).to_dict()}
        if args.methods is not None:
            missing = [m for m in _methods(args) if m not in profile.get("methods", [])]
            if missing:
                raise ConfigError(f"{args.profile} was made for methods {', '.join(profile.get('methods', []))}; it "
                                  f"has no candidates of {', '.join(missing)}: profile them first")
        check_header(profile, want, path=args.profile)
        missing = profile.get("pending") or []
        if missing:
            raise ConfigError(f"{args.profile} is incomplete ({len(missing)} matrices not profiled yet, e.g. "
                              f"{missing[0]}): rerun `kronsearch profile` to finish it")
        check_matrices(profile, skeleton, path=args.profile)
    methods = _methods(args, default=profile.get("methods"))
    embeddings = _plan_embeddings(args, profile)

    from kron.errors import PlanError

    damage = args.damage or "kl"
    if args.damage is None:
        try:
            items_from_profile(profile, "params", methods=methods, damage="kl", embeddings=embeddings)
        except PlanError:
            damage = "proxy"
            print(f"kronsearch plan: note: {args.profile or 'the profile'} has no model-level (KL) measurement for "
                  "some matrix, so the plan minimises the summed relative output error (--damage proxy); make the "
                  f"profile with --kl-subset {KL_POINTS} for the KL objective", file=sys.stderr)
    args.damage = damage
    improve = (model_search(args, model, profile, methods, embeddings, calibration_stats_for(args, model, src),
                            _heldout(args, model, src), len(budgets) > 1) if on_model else None)

    results = []
    for budget in budgets:
        try:
            sol = auto_plan(profile, budget, methods=methods, solver=args.solver, damage=args.damage,
                            embeddings=embeddings)
        except PlanError as exc:
            if len(budgets) == 1 or "unreachable" not in str(exc):
                raise
            print(f"kronsearch plan: skipped {budget}: {exc}", file=sys.stderr)
            continue
        searched = None
        if improve is not None:
            searched = improve(budget, sol)
            sol = searched.solution
        resolved = resolved_specs(sol)
        verb = "evolved" if sol.solver.endswith("+evo") else "refined"
        what = (f"{verb} on the model: KL {searched.start_kl:.4g} -> {searched.kl:.4g}" if searched else
                f"predicted damage {sol.damage:.4g} ({_DAMAGE_WORDS[args.damage]})")
        plan = CompressionPlan.from_resolved(resolved, name=f"auto {budget}",
                                             description=f"kronsearch plan --auto --budget {budget}: {what}")
        import copy

        sized = copy.deepcopy(skeleton)
        report = apply_specs(sized, plan.resolve(sized), init="none")  # the plan resolves on the model
        after, before = report.sizes(), report.sizes(before=True)
        if budget.breaches(after, before):  # the profile's counts and the model's disagree: never hand out a plan
            raise ConfigError(f"internal check failed: the plan for {budget} measures {after[budget.axis]:,} on the "
                              "model; the profile's sizes do not match it (make the profile again)")
        path = None
        if args.out:
            path = per_budget_path(args.out, budget, len(budgets) > 1)
            plan.save(path)
        results.append((budget, sol, plan, report, path, searched))

    if not results:
        raise PlanError(f"no budget of {', '.join(map(str, budgets))} is reachable with this profile's candidates")
    if args.json:
        out = []
        for budget, sol, plan, report, path, searched in results:
            d = sol.to_dict()
            d.update({"budget": str(budget), "damage_kind": "kl, measured jointly" if searched else args.damage,
                      **search_record(searched), "plan": plan.to_dict(),
                      "params": report.params_after, "macs": report.macs_per_token_after,
                      "ratio": report.compression_ratio,
                      "plan_file": str(path) if path else None, "notes": sol.notes})
            out.append(d)
        print(json.dumps({"model": args.model, "profile": args.profile, "plans": out}))
        return 0
    for budget, sol, plan, report, path, searched in results:
        if searched is not None:
            quality, lines = search_text(searched)
        elif sol.exact:
            quality = "exact"
        elif sol.gap <= 0:
            quality = "optimal: its lower bound is met"
        else:
            quality = f"within {sol.gap:.3g} of optimal"
        print(f"auto plan for {budget} on {args.model} ({sol.solver}, {quality}):")
        rows = []
        for name, o in sol.choice.items():
            mx = profile["matrices"][name]
            rows.append((name, o.label, f"{_compression(mx, o.label):.2f}x",
                         f"{o.damage:.4g}"))
        _print_table(("matrix", "choice", "compression", "damage"), rows)
        if searched is not None:
            for line in lines:
                print(f"  {line}")
            dmg = "KL measured"
        else:
            dmg = (f"predicted damage {sol.damage:.4g} ({_DAMAGE_WORDS[args.damage]}; lower bound "
                   f"{sol.bound:.4g})")
        print(f"  {dmg}; {report.params_after:,} params ({human(report.params_after, '?')}), "
              f"{report.macs_per_token_after:,} MACs/token, ratio {report.compression_ratio:.3f}")
        for note in sol.notes:
            print(f"  note: {note}")
        if path:
            print(f"  plan written to {path}")
    if len(results) > 1:
        print("front:")
        _print_table(("budget", "params", "macs/token", "ratio", "damage"),
                     [(str(b), f"{r.params_after:,}", f"{r.macs_per_token_after:,}", f"{r.compression_ratio:.3f}",
                       f"{s.damage:.4g}") for b, s, _, r, _, _ in results])
    return 0


def _plan_embeddings(args, profile):
    """What `auto_plan` may do with the word embedding: True (every factor the profile holds), False (keep it), or
    the factors given (each must be in the profile)."""
    from kron.errors import ConfigError

    factors = _embedding_factors(args)
    if factors is None:
        return True
    if not factors:
        return False
    held = {f for mx in profile["matrices"].values() if mx.get("group") == "embedding" for f in mx.get("factors", [])}
    missing = [f for f in factors if f not in held]
    if missing:
        raise ConfigError(f"--embedding-factors {','.join(map(str, factors))}: the profile has no embedding "
                          f"candidate with factor {', '.join(map(str, missing))} (it holds "
                          f"{', '.join(map(str, sorted(held))) or 'none'}); profile them first")
    return factors


def _compression(mx, label: str) -> float:
    """The compression of the matrix's candidate `label` (an embedding's: its table's, without a tied head's copy)."""
    return next((c["compression"] for c in mx["candidates"] if c["label"] == label), 1.0)


def calibration_stats_for(args, model, src: str):
    """Calibration statistics of the model on --calib (cached; the data loading lives in trials.calibration)."""
    from kron.errors import ConfigError
    from kron.models import load_tokenizer
    from trials.calibration import DEFAULT_CALIB_TOKENS, calibration_stats

    tokens = DEFAULT_CALIB_TOKENS if args.calib_tokens is None else args.calib_tokens
    if tokens < 1:
        raise ConfigError(f"--calib-tokens must be a positive number of tokens, got {tokens}")
    if args.calib_seq_len < 2:
        raise ConfigError(f"--calib-seq-len must be >= 2, got {args.calib_seq_len}")
    tokenizer = load_tokenizer(src)
    return calibration_stats(model, tokenizer, args.calib, tokens, seq_len=args.calib_seq_len,
                             config_name=args.calib_config, model_id=src)
