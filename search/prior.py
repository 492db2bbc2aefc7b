"""What the teacher's sensitivity says about a search space, before any trial: the damage of every option of every
searched matrix, the prior that drops hopeless options (`space.prior`), and the automatic seed plans
(`search.seed_plans: [auto]`).

The damage of an option on a matrix is `kron.profile`'s: the relative output error ‖(W − Ŵ) x‖² / ‖W x‖² on the
teacher's calibration tokens with the data-aware init, computed for exactly the options the space offers. It needs
the real teacher (not the meta-device skeleton that sizes the space) and calibration statistics; both are computed
once in the driver before Ray starts and cached on disk (`trials.calibration`, and `damages/` beside it), so a
resumed search or a dry run reuses them.

* The prior: an option whose damage exceeds `space.prior.max_damage` on any matrix of its choice is not offered
  (the least damaging option of each choice always stays, so no choice is left empty).
* Automatic seeds: per choice, the option that minimises the summed damage of the plan under a size budget (the
  multiple-choice knapsack of `kron.autoplan`, with the space's choices as items, so tied layers and fused blocks
  are respected), at `auto:N` budgets (N = 3 by default) spread evenly in log-size between the cheapest plan of the
  space and the teacher (or the space's budget). Embedding choices have no proxy damage: with KL seeds
  (`search.seed_damage: kl`, `search.seed_embedding: true`, the defaults) the KL of every embedding option is
  measured and the knapsack plans the embedding like any matrix; otherwise it keeps the teacher's table when the
  space allows `keep`, else takes its mildest factor.
* Structured pruning (`prune` in space.methods) is a block choice, not a matrix option (`search.space.BlockChoice`):
  no per-matrix damage describes it, so the prior never drops a block option and automatic seeds leave every block
  unpruned (its matrices take the options the knapsack picked).
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import replace

from analysis.textfmt import human
from kron.errors import ConfigError, UserError
from kron.vocab import SIZE_AXES

__all__ = ["AUTO_DEFAULT", "auto_count", "auto_seeds", "needs_profile", "search_damages", "seed_kl_damages",
           "teacher_size"]

AUTO_DEFAULT = 3  # automatic seed plans for a plain "auto"


def auto_count(name: str) -> int | None:
    """N of a seed name "auto" / "auto:N", None for any other seed."""
    from .config import AUTO_SEED

    m = AUTO_SEED.fullmatch(name)
    if m is None:
        return None
    n = int(m.group(1) or AUTO_DEFAULT)
    if not 1 <= n <= 20:
        raise ConfigError(f"search.seed_plans: {name!r}: give between 1 and 20 automatic plans (auto:N)")
    return n


def auto_target(name: str) -> str | None:
    """TARGET of a seed name "auto@TARGET" (a size, or a preset / plan file whose size it takes), else None."""
    from .config import AUTO_AT

    m = AUTO_AT.fullmatch(name)
    if m is None:
        return None
    target = m.group(1).strip()
    if not target:
        raise ConfigError(f"search.seed_plans: {name!r}: give a size (auto@3.5M) or a preset / plan file "
                          "(auto@lowrank:2) after auto@")
    return target


def needs_profile(cfg) -> bool:
    """Whether building the space of `cfg` needs the teacher's damages (a prior or automatic seeds)."""
    return cfg.space.prior is not None or any(auto_count(n) is not None or auto_target(n) is not None
                                              for n in cfg.search.seed_plans)


def _specs(space, *, embeddings: bool = False) -> dict[str, list[tuple[str, object]]]:
    """Module name -> [(option, spec with the module's blocks)] for every linear option of the space (keep left
    out); embeddings=True: for every embedding factor option instead."""
    from kron.methods import parse_option

    out: dict[str, list] = {}
    for c in space.choices:
        for mx in c.matrices:
            if (mx.kind == "embedding") != embeddings:
                continue
            for o in c.options:
                if o == "keep":
                    continue
                spec = parse_option(o)
                if mx.blocks > 1 and hasattr(spec, "blocks"):
                    spec = replace(spec, blocks=mx.blocks)
                out.setdefault(mx.name, []).append((o, spec))
    return out


def _teacher_and_cache(cfg, wanted: dict, extra_key: dict, prefix: str):
    """(teacher, tokenizer, calibration statistics, calibration tokens, cache key, cache file, cached damages or
    None) for damages of the `wanted` options (module -> [(option, spec)]) of a search config's teacher."""
    from kron.models import pick_device
    from trials.calibration import calibration_for, default_calib_source
    from trials.data import model_fingerprint, default_cache_dir
    from trials.inputs import load_teacher

    trial = cfg.trial
    tokens = cfg.space.prior.calib_tokens if cfg.space.prior is not None and cfg.space.prior.calib_tokens else None
    tokens = tokens or trial.init_config.calib_tokens
    teacher, tokenizer = load_teacher(trial, pick_device(trial.device))
    try:
        stats = calibration_for(trial, teacher, tokenizer, tokens)
    except UserError as exc:
        source = trial.init_config.calib or default_calib_source(trial)[0]
        raise ConfigError(f"the search's sensitivity profile (space.prior / search.seed_plans: auto) needs "
                          f"calibration data from {source!r}: {exc}") from None
    key = {"teacher": model_fingerprint(teacher), "calibration": getattr(stats, "key", None),
           "tokens": tokens, "options": {n: [o for o, _ in v] for n, v in wanted.items()}, **extra_key}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = default_cache_dir() / "damages" / f"{prefix}{digest}.json"
    cached = None
    if path.is_file():
        try:
            cached = json.loads(path.read_text())["damages"]
        except (OSError, ValueError, KeyError):
            pass  # recomputed
    return teacher, tokenizer, stats, tokens, key, path, cached


def search_damages(cfg, space, stream=None) -> dict[str, dict[str, float]]:
    """Module name -> option -> damage for every linear option of `space` (see the module docstring), from the
    teacher of `cfg` and its calibration data; cached on disk by teacher, calibration data and options."""
    from kron.fsutil import atomic_write_json
    from kron.damage import option_damages

    wanted = _specs(space)
    if not wanted:
        return {}
    teacher, _, stats, _, key, path, cached = _teacher_and_cache(cfg, wanted, {}, "")
    if cached is not None:
        return cached
    print(f"sensitivity profile of the space: {len(wanted)} matrices, "
          f"{sum(len(v) for v in wanted.values())} options ...", file=stream or sys.stderr)
    got = option_damages(teacher, stats, {n: [sp for _, sp in v] for n, v in wanted.items()})
    damages = {n: {o: d for (o, _), d in zip(wanted[n], got[n])} for n in wanted}
    atomic_write_json(path, {"key": key, "damages": damages})
    return damages


KL_POINTS = 4  # options per matrix whose KL the automatic seeds measure (search.seed_damage: kl)


def seed_kl_damages(cfg, space, damages: dict, stream=None) -> dict[str, dict[str, float]]:
    """Module name -> option -> the teacher's KL with that matrix alone compressed to that option (data-aware
    init), for the automatic seeds (`search.seed_damage: kl`): measured for `KL_POINTS` options per matrix spread
    over its proxy damages (`damages`, `search_damages`), on the held-out calibration batches, and interpolated in
    log-log along the proxy for the others (`kron.autoplan.kl_damages`). Why: the relative output error is not
    comparable across matrices (the same error costs one matrix 100x the KL of another), so plans minimising its sum
    keep the wrong matrices dense. Cached on disk beside the damages."""
    import torch

    from kron.autoplan import kl_damages
    from kron.calibration import ModuleStats
    from kron.fsutil import atomic_write_json
    from kron.methods import get_method
    from kron.measure import ModelMeasure, spread_indices
    from trials.calibration import heldout_for

    wanted = {n: v for n, v in _specs(space).items() if n in damages}
    if not wanted:
        return {}
    embeddings = _specs(space, embeddings=True) if cfg.search.seed_embedding else {}
    extra = {"kl_points": KL_POINTS, **({"embeddings": {n: [o for o, _ in v] for n, v in embeddings.items()}}
                                        if embeddings else {})}
    teacher, tokenizer, stats, tokens, key, path, cached = _teacher_and_cache(cfg, wanted, extra, "kl-")
    if cached is not None:
        return cached
    heldout = heldout_for(cfg.trial, teacher, tokenizer, tokens)
    n_emb = sum(len(v) for v in embeddings.values())
    print(f"model-level damage for the automatic seeds: {len(wanted)} matrices x {KL_POINTS} options"
          f"{f' + {n_emb} embedding factors' if n_emb else ''} ...", file=stream or sys.stderr)
    teacher.eval()
    # whole batches up to 1,024 tokens, as releases before row-level cuts measured: the seeds of a resumed search
    # (and cached damages) stay the same
    measure = ModelMeasure(teacher, heldout, 1024, whole_batches=True)
    modules = dict(teacher.named_modules())

    def kl_with(name: str, spec, init: str, stats=None) -> float:
        """The teacher's measure with module `name` alone built as `spec`."""
        with torch.no_grad():
            kw = {"stats": stats} if stats is not None else {}  # data-free methods take no statistics
            layer = get_method(spec.method).build(modules[name], spec, init, **kw).eval()
        return measure.with_layers({name: layer})

    out: dict[str, dict[str, float]] = {}
    for name, opts in wanted.items():
        st = stats.stats(name)
        one = ModuleStats(S=st.S, tokens=st.tokens)
        ranked = sorted((damages[name][o], o, spec) for o, spec in opts if damages[name].get(o) is not None)
        positive = [r for r in ranked if r[0] > 0]
        pick = {positive[i][1] for i in spread_indices(len(positive), KL_POINTS)}
        cands = []
        for d, o, spec in ranked:
            md = kl_with(name, spec, "data", one) if o in pick else None
            cands.append({"method": spec.method, "damage": d, "model_damage": md})
        if not any(c["model_damage"] for c in cands):  # the model does not notice this matrix compressed
            out[name] = {o: 0.0 for _, o, _ in ranked}
            continue
        out[name] = {o: v for (_, o, _), v in zip(ranked, kl_damages({"candidates": cands}, name=name))}
    for name, opts in embeddings.items():  # few options, no proxy to interpolate along: every one measured
        # data-free, as trials build it (tied: the LM head keeps the dense table)
        out[name] = {o: max(0.0, kl_with(name, spec, "svd")) for o, spec in opts}
    atomic_write_json(path, {"key": key, "damages": out})
    return out


def choice_damage(choice, option: str, damages: dict, *, how=max) -> float | None:
    """The damage of `option` over a choice's matrices (max or sum); 0 for keep, None when not profiled."""
    if option == "keep":
        return 0.0
    vals = [damages.get(mx.name, {}).get(option) for mx in choice.matrices]
    if any(v is None for v in vals):
        return None
    return float(how(vals))


def pruned_options(space, damages: dict, max_damage: float) -> dict[str, list[str]]:
    """Choice key -> the options the prior drops (damage above `max_damage` on some matrix of the choice); the
    least damaging option of each choice is never dropped."""
    out = {}
    for c in space.choices:
        scored = [(o, choice_damage(c, o, damages)) for o in c.options]
        known = [(o, d) for o, d in scored if d is not None and o != "keep"]
        if not known:
            continue
        drop = [o for o, d in known if d > max_damage]
        if len(drop) == len(known):
            best = min(known, key=lambda od: od[1])[0]
            drop = [o for o in drop if o != best]
        if drop:
            out[c.key] = drop
    return out


def auto_seeds(space, damages: dict, count: int, metric: str, evolve=None
               ) -> list[tuple[str, dict[str, str], frozenset]]:
    """`count` automatic plans of `space` as (label, module -> option, decomposed layers), cheapest first; see the
    module docstring. metric: the size axis (params, params_excl_output_embedding, macs_per_token, bytes).
    evolve(label, items, room, Solution, fixed choice) -> Solution: each knapsack plan improved on the model
    (`search.seed_evolution`, labels then end in "+evo"); None: the knapsack's plans."""
    from kron.autoplan import solve
    from kron.errors import PlanError

    items, fixed_choice, lo, hi = _knapsack(space, damages, metric)
    if not lo < hi:
        raise ConfigError(f"search.seed_plans: 'auto': the space's cheapest plan ({lo:,}) is not below its largest "
                          f"allowed size ({hi:,}); nothing to spread automatic plans over")
    out, seen = [], set()
    for i in range(1, count + 1):
        target = int(math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / (count + 1)))
        try:
            sol = solve(items, target - lo)
        except PlanError:
            continue
        label = f"seed:auto@{human(target)}"
        if evolve is not None and sol.choice:
            sol, label = evolve(label, items, target - lo, sol, fixed_choice), label + "+evo"
        options, layers, key = _seed_of(space, sol, fixed_choice)
        if key in seen or not options:
            continue
        seen.add(key)
        out.append((label, options, layers))
    return out


def auto_seed_at(space, damages: dict, target: int, metric: str, label: str, evolve=None
                 ) -> tuple[str, dict[str, str], frozenset]:
    """One automatic plan of `space` at most `target` in size on `metric` (the knapsack of `auto_seeds`), as
    (label, module -> option, decomposed layers); evolve: as for `auto_seeds`. ConfigError when the space has no
    plan that small."""
    from kron.autoplan import solve

    items, fixed_choice, lo, _ = _knapsack(space, damages, metric)
    if target < lo:
        raise ConfigError(f"search.seed_plans: {label.removeprefix('seed:')!r}: the space's smallest plan has "
                          f"{lo:,} ({metric}), above the target {int(target):,}")
    sol = solve(items, int(target) - lo)
    if evolve is not None and sol.choice:
        sol, label = evolve(label, items, int(target) - lo, sol, fixed_choice), label + "+evo"
    options, layers, _ = _seed_of(space, sol, fixed_choice)
    if not options:
        raise ConfigError(f"search.seed_plans: {label.removeprefix('seed:')!r}: at {int(target):,} ({metric}) the "
                          "automatic plan compresses nothing; give a smaller target")
    return label, options, layers


def _seed_of(space, sol, fixed_choice: dict) -> tuple[dict[str, str], frozenset, tuple]:
    """(module -> option, decomposed layers, a key of the choice) of a knapsack solution over the space's choices."""
    choice = {**fixed_choice, **{k: o.label for k, o in sol.choice.items()}}
    options, layers = {}, set()
    for c in space.choices:
        opt = choice.get(c.key, "keep")
        if opt == "keep":
            continue
        for mx in c.matrices:
            options[mx.name] = opt
            if mx.layer is not None:
                layers.add(mx.layer)
    return options, frozenset(layers), tuple(sorted(choice.items()))


def _knapsack(space, damages: dict, metric: str):
    """(items with costs above each choice's cheapest option, the fixed choices, the cheapest plan's size, the
    largest allowed size) of the automatic seeds' knapsack on `metric`."""
    from kron.autoplan import Item, Option

    if space.layer_mode == "count":
        raise ConfigError("search.seed_plans: 'auto' needs a space whose layers are all, free or a fixed list; with "
                          "layers {count: k} give presets or plan files as seeds")
    axis = metric if metric in SIZE_AXES else "params"
    base = space.teacher_sizes()[axis]
    items, fixed_choice, fixed_cost = [], {}, 0
    for c in space.choices:
        n = len(c.matrices)
        known = [choice_damage(c, o, damages) for o in c.options if o != "keep"]
        if (any(d is None for d in known) if any(mx.kind == "embedding" for mx in c.matrices)
                else all(d is None for d in known)):  # an embedding is planned only when every option is measured
            opt = "keep" if "keep" in c.options else c.options[0]  # embedding options go from mild to strong
            fixed_choice[c.key] = opt
            fixed_cost += n * c.deltas[opt][axis]
            continue
        opts = list(c.options)
        if space.layer_mode == "free" and "keep" not in opts and c.layer is not None:
            opts.append("keep")  # a layer left dense; seed_options adds "keep" to the choice when a seed needs it
        options = []
        for o in opts:
            d = choice_damage(c, o, damages, how=sum)
            if d is not None:
                options.append(Option(o, o, n * c.deltas[o][axis] if o in c.deltas else 0, d))
        items.append(Item(c.key, options))
    if not items:
        raise ConfigError("search.seed_plans: 'auto' found no profiled matrix in the space (only embeddings?)")
    shift = [min(o.cost for o in it.options) for it in items]
    items = [Item(it.name, [replace(o, cost=o.cost - s) for o in it.options]) for it, s in zip(items, shift)]
    lo = base + fixed_cost + sum(shift)  # the cheapest plan's size
    return items, fixed_choice, lo, space.size_cap(axis)


def teacher_size(space, metric: str) -> int:
    """The uncompressed model's size on a size axis (`kron.vocab.AXES`; anything else: parameters)."""
    return space.teacher_sizes()[metric if metric in SIZE_AXES else "params"]
