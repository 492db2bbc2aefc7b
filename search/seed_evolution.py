"""Automatic seeds evolved on the model (`search.seed_evolve`).

`search.prior.auto_seeds` solves a knapsack over the space's own choices (one item per choice: a matrix, a fused or
tied group, a layer's block) on summed per-matrix damages. With `seed_evolve` set, each such plan is then evolved
by `kron.evo.evolve_choice` before it becomes a seed: the same items and room, children by budget-keeping switches
along each choice's staircase of options, judged by the KL of the whole teacher with every matrix of the plan built
as its option (data-aware init from the calibration statistics, embeddings data-free, as trials build them) on the
held-out calibration tokens (`trials.calibration.heldout_for`). So the search starts from plans the model itself
ranked, not from the sum of their parts — the no-training regime's best plans, then trained like every other trial.

Evolved seeds are cached on disk beside the damages (by teacher, calibration data, items, start, room and
settings), so a resumed search gets exactly the seeds it started with; the evolution's own state file is kept
there too while it runs, so a preparation killed half-way resumes from its last generation.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import replace

__all__ = ["seed_evolver"]


def seed_evolver(cfg, space, stream=None):
    """A function (label, items, room, Solution, fixed choice) -> Solution evolving one automatic seed of `space`
    (a prepared space with damages) on the teacher of `cfg`; the teacher, its statistics and held-out batches are
    loaded on the first call, once."""
    settings = cfg.search.seed_evolve
    out = stream or sys.stderr
    held: dict = {}

    def load():
        if held:
            return held
        from trials.calibration import heldout_for

        from .prior import _teacher_and_cache

        teacher, tokenizer, stats, tokens, key, _, _ = _teacher_and_cache(cfg, {}, {"evolve": True}, "evo-")
        teacher.eval()
        held.update(teacher=teacher, stats=stats, key=key, heldout=heldout_for(cfg.trial, teacher, tokenizer, tokens))
        return held

    def evolve_one(label: str, items, room: int, sol, fixed_choice: dict):
        from kron.evo import evolve_choice
        from kron.fsutil import atomic_write_json
        from trials.data import default_cache_dir

        h = load()
        settings_d = settings.model_dump(mode="json")
        key = {"teacher": h["key"]["teacher"], "calibration": h["key"]["calibration"], "tokens": h["key"]["tokens"],
               "room": int(room), "fixed": dict(sorted(fixed_choice.items())),
               "items": [(it.name, [(o.label, o.cost, repr(o.damage)) for o in it.options]) for it in items],
               "start": sorted((n, o.label) for n, o in sol.choice.items()), "settings": settings_d}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
        folder = default_cache_dir() / "damages"
        path, state = folder / f"evo-seed-{digest}.json", folder / f"evo-seed-{digest}.state.json"
        by_label = {it.name: {o.label: o for o in it.options} for it in items}
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
                choice = {n: by_label[n][lab] for n, lab in saved["choice"].items()}
                print(f"  {label}: evolved seed from the cache (KL {saved['start_kl']:.4g} -> {saved['kl']:.4g})",
                      file=out, flush=True)
                return replace(sol, choice=choice, damage=float(saved["kl"]), solver=sol.solver + "+evo")
            except (OSError, ValueError, KeyError, TypeError):
                pass  # evolved again
        evaluate_many = _evaluator(space, h["teacher"], h["stats"], h["heldout"], settings.tokens, fixed_choice)
        t0 = time.time()
        evo = evolve_choice(items, room, sol.choice, h["heldout"], evaluate_many, budget=label, solution=sol,
                            generations=settings.generations, offspring=settings.offspring,
                            token_levels=tuple(settings.tokens), seed=settings.seed, state_path=state)
        print(f"  {label}: evolved on the model, KL {evo.start_kl:.4g} -> {evo.kl:.4g} ({100 * evo.gain:.1f}% lower; "
              f"{evo.generations} generations, {evo.evals} measurements, {time.time() - t0:.0f} s)", file=out,
              flush=True)
        atomic_write_json(path, {"key": key, "choice": {n: o.label for n, o in evo.solution.choice.items()},
                                 "start_kl": evo.start_kl, "kl": evo.kl, "evolution": evo.to_dict()})
        state.unlink(missing_ok=True)
        return replace(sol, choice=dict(evo.solution.choice), damage=evo.kl, solver=sol.solver + "+evo",
                       notes=list(evo.solution.notes))

    return evolve_one


def _evaluator(space, teacher, stats, heldout, token_levels, fixed_choice: dict):
    """evaluate_many(choices, level) for plans over the space's choices (choice key -> Option whose label is the
    space's option): every matrix of a choice built as its option once (data-aware init for a linear matrix, the
    data-free one for an embedding, as trials do), the fixed choices' options in every plan, the teacher's KL with
    them swapped in (`kron.measure.ModelMeasure`, at each level's token budget)."""
    import torch

    from kron.calibration import ModuleStats
    from kron.measure import ModelMeasure
    from kron.methods import get_method, parse_option

    choices = {c.key: c for c in space.choices}
    modules = dict(teacher.named_modules())
    measures = [ModelMeasure(teacher, heldout, t) for t in token_levels]
    built: dict = {}

    def layer(mx, option: str):
        if (mx.name, option) not in built:
            spec = parse_option(option)
            if mx.blocks > 1 and hasattr(spec, "blocks"):
                spec = replace(spec, blocks=mx.blocks)
            method = get_method(spec.method)
            with torch.no_grad():
                if mx.kind == "embedding" or not method.data_init:
                    new = method.build(modules[mx.name], spec, "svd")
                else:
                    st = stats.stats(mx.name)
                    new = method.build(modules[mx.name], spec, "data", stats=ModuleStats(S=st.S, tokens=st.tokens))
            built[(mx.name, option)] = new.eval()
        return built[(mx.name, option)]

    def layers_of(plan: dict) -> dict:
        out = {}
        for key, option in plan.items():
            if option == "keep":
                continue
            for mx in choices[key].matrices:
                out[mx.name] = layer(mx, option)
        return out

    def evaluate_many(plans: list, level: int) -> list[float]:
        return [measures[level].with_layers(layers_of({**fixed_choice, **{k: o.label for k, o in p.items()}}))
                for p in plans]

    return evaluate_many
