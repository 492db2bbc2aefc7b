"""`kronsearch plan --auto`'s searches on the model itself: `--refine N` (greedy exchange moves, `kron.refine`) and
`--search evo` (an evolutionary search after EvoPress, `kron.evo`), both judged by the KL of the whole compressed
model on the held-out calibration batches.

`search.profile_commands.plan_auto` calls `add_search_arguments` (the flags), `check_search_args` (their values,
before any work), `model_search` (a function improving one budget's knapsack plan) and `search_record` /
`search_text` (what the output says of it: the KL before and after and what it cost).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

EVO_FLAGS = ("generations", "offspring", "evo_state", "evo_tokens", "time_budget_s", "evo_workers", "evo_seed")


def add_search_arguments(p) -> None:
    """--refine N, --search evo and the evolution's settings, on the `plan` subcommand."""
    p.add_argument("--refine", type=int, default=0, metavar="N",
                   help="with --auto and --calib: improve each plan by exchange moves (one matrix one candidate "
                        "better, another one worse, within the budget) judged by the KL of the whole compressed model "
                        "on the held-out calibration batches, at most N measurements (kron.refine; 0: off, the "
                        "default; 40 is a good start)")
    p.add_argument("--search", choices=("none", "evo"), default=None,
                   help="with --auto and --calib: evo evolves each plan on the model (kron.evo, after EvoPress): "
                        "each generation --offspring children of the best plan so far, each by 1-3 switches (one "
                        "matrix a step up its candidates, paid for by steps down of others, within the budget), "
                        "screened on few held-out tokens, the best re-measured on more; none (the default): the "
                        "knapsack's plan")
    p.add_argument("--generations", type=int, default=None, metavar="N",
                   help="with --search evo: generations (default 40)")
    p.add_argument("--offspring", type=int, default=None, metavar="K",
                   help="with --search evo: children per generation (default 16; the best quarter is re-measured)")
    p.add_argument("--evo-tokens", default=None, metavar="T1,T2",
                   help="with --search evo: held-out tokens per measurement at each selection step, increasing "
                        "(default 512,4096; 'all' last: every held-out token; the held-out part is 1/8 of "
                        "--calib-tokens)")
    p.add_argument("--evo-state", default=None, metavar="JSON",
                   help="with --search evo: save the search after each generation here and resume from it when it "
                        "exists (refused when made with other settings); with --budgets one file per budget")
    p.add_argument("--time-budget-s", type=float, default=None, metavar="S",
                   help="with --search evo: stop each plan's evolution after S seconds (the best plan so far)")
    p.add_argument("--evo-seed", type=int, default=None, metavar="N",
                   help="with --search evo: the random seed of the switches (default 0; another seed is another run, "
                        "to see how much the result depends on it)")
    p.add_argument("--evo-workers", type=int, default=None, metavar="N",
                   help="with --search evo: measure each generation's plans on N Ray workers, each holding a copy of "
                        "the model and its built layers (local Ray, one CPU each, unless Ray runs here already); "
                        "default: in this process")


def _evo_tokens(text: str | None) -> tuple:
    from kron.autoplan import parse_number
    from kron.errors import ConfigError
    from kron.evo import DEFAULT_TOKEN_LEVELS

    if text is None:
        return DEFAULT_TOKEN_LEVELS
    out = []
    for t in [t.strip() for t in str(text).split(",")]:
        n = None if t.lower() == "all" else parse_number(t)
        if t.lower() != "all" and (n is None or n != int(n) or n < 1):
            raise ConfigError(f"--evo-tokens takes positive token counts separated by commas ('all' last), e.g. "
                              f"512,4096; got {text!r}")
        out.append(None if n is None else int(n))
    return tuple(out)


def check_search_args(args) -> bool:
    """ConfigError for a bad value or combination of --refine / --search and its flags; True when a search on the
    model will run (it needs the model and --calib)."""
    from kron.errors import ConfigError
    from kron.evo import check_evo_settings

    if args.refine < 0:
        raise ConfigError(f"--refine takes a number of measurements >= 0, got {args.refine}")
    evo = args.search == "evo"
    if not evo:
        given = [f"--{k.replace('_', '-')}" for k in EVO_FLAGS if getattr(args, k, None) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} {'goes' if len(given) == 1 else 'go'} with --search evo")
    if evo and args.refine:
        raise ConfigError("--search evo and --refine are two searches on the model: give one (--search evo "
                          "explores more widely; --refine N is the greedy one)")
    if (evo or args.refine) and args.calib is None:
        flag = "--search evo" if evo else "--refine"
        raise ConfigError(f"{flag} measures plans on the model: give --calib SRC (its held-out batches are the "
                          "measure; with --profile too, the profile is reused)")
    if evo and args.evo_workers is not None and (isinstance(args.evo_workers, bool) or args.evo_workers < 1):
        raise ConfigError(f"--evo-workers takes a number of workers >= 1, got {args.evo_workers}")
    if evo:
        args.evo_levels, _ = check_evo_settings(
            40 if args.generations is None else args.generations, 16 if args.offspring is None else args.offspring,
            3, _evo_tokens(args.evo_tokens), time_budget_s=args.time_budget_s)
    return bool(evo or args.refine)


def per_budget_path(out: str, budget, several: bool, suffix: str = ".yaml") -> Path:
    """`out`, or with several budgets `out` tagged with the budget (front.yaml -> front-ratio2.yaml)."""
    p = Path(out)
    if not several:
        return p
    tag = re.sub(r"[^A-Za-z0-9.]+", "", str(budget).replace("=", ""))
    return p.with_name(f"{p.stem}-{tag}{p.suffix or suffix}")


def model_search(args, model, profile, methods, embeddings, stats, heldout, several: bool):
    """A function (budget, knapsack Solution) -> Refinement (--refine) or Evolution (--search evo) improving the plan
    on `model` with its calibration statistics and held-out batches (read once for every budget); None when no
    search was asked for."""
    quiet = args.json
    if args.search == "evo":
        from kron.evo import evolve_plan

        generations = 40 if args.generations is None else args.generations

        def evolve(budget, sol):
            last = [None]

            def bar(gen, best):  # the first, every 10th, the last and each that found a better plan
                if gen == 1 or gen % 10 == 0 or gen == generations or best != last[0]:
                    print(f"  evolve {budget}: generation {gen}/{generations}, KL {best:.4g}", file=sys.stderr,
                          flush=True)
                last[0] = best

            state = per_budget_path(args.evo_state, budget, several, ".json") if args.evo_state else None
            kwargs = dict(methods=methods, damage=args.damage, embeddings=embeddings, generations=generations,
                          seed=0 if args.evo_seed is None else args.evo_seed,
                          offspring=16 if args.offspring is None else args.offspring, token_levels=args.evo_levels,
                          time_budget_s=args.time_budget_s, state_path=state, progress=None if quiet else bar)
            if not args.evo_workers:
                return evolve_plan(model, stats, profile, budget, sol, heldout, **kwargs)
            from .evo_workers import EvoWorkers

            with EvoWorkers(model, stats, heldout, args.evo_levels, profile.get("ridge"), args.evo_workers) as pool:
                return evolve_plan(model, stats, profile, budget, sol, heldout, evaluate_many=pool.evaluate_many,
                                   workers=args.evo_workers, **kwargs)

        return evolve
    if not args.refine:
        return None
    from kron.refine import refine_plan

    def refine(budget, sol):
        def bar(done, best):
            if done == 1 or done % 10 == 0 or done == args.refine:
                print(f"  refine {budget}: {done}/{args.refine} measurements, KL {best:.4g}", file=sys.stderr,
                      flush=True)

        return refine_plan(model, stats, profile, budget, sol, heldout, methods=methods, damage=args.damage,
                           max_evals=args.refine, embeddings=embeddings, progress=None if quiet else bar)

    return refine


def search_record(result) -> dict:
    """The JSON fields of a search's result: "refinement" (None when not run, as before there was an evolution) and,
    when `--search evo` ran, "evolution" (absent otherwise: a plan's JSON without it is what earlier releases wrote)."""
    from kron.evo import Evolution

    if isinstance(result, Evolution):
        return {"refinement": None, "evolution": result.to_dict()}
    return {"refinement": result.to_dict() if result is not None else None}


def search_text(result) -> tuple[str, list[str]]:
    """(how the plan was found, for its title line; the lines saying what the search did and cost)."""
    from kron.evo import Evolution

    if isinstance(result, Evolution):
        levels = ", ".join(f"{e:,} on {n:,}" for e, n in zip(result.evals_per_level, result.level_tokens))
        title = (f"evolved from the knapsack's plan: {result.generations} generations, {result.evals} measurements, "
                 f"{result.seconds:.0f} s")
        lines = [f"KL of the whole model on {result.level_tokens[-1]:,} held-out calibration tokens: "
                 f"{result.start_kl:.4g} (the knapsack's plan) -> {result.kl:.4g} ({100 * result.gain:.1f}% lower)",
                 f"cost: {result.evals} measurements ({levels} tokens), {result.tokens:,} tokens read, "
                 f"{result.seconds:.1f} s, {result.workers} worker{'s' if result.workers != 1 else ''}; stopped: "
                 f"{result.stopped}" + (f" (resumed at generation {result.resumed_from})" if result.resumed_from
                                        else "")]
        return title, lines
    title = (f"refined from the knapsack's plan: {len(result.moves)} moves in {result.evals} measurements, "
             f"{result.seconds:.0f} s")
    lines = [f"KL of the whole model on {result.tokens:,} held-out calibration tokens: {result.start_kl:.4g} (the "
             f"knapsack's plan) -> {result.kl:.4g} ({100 * result.gain:.1f}% lower)"]
    return title, lines + [f"move: {move}" for move in result.moves]
