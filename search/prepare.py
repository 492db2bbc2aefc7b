"""The explicit preparation step of a search space: what needs the real teacher and its calibration data — the
sensitivity damages of the space's options (the prior, `space.prior`), the model-level KL of the automatic seeds and
the seed plans themselves (`search.seed_plans`) — computed once before Ray starts, cached on disk, with a progress
line of its own. `SearchSpace.from_config` builds the space from the teacher's config on the meta device only (no
weights, no data), so sizing a space, checking a config and dry runs without seeds stay instant; `kronsearch
search` and `run_search` call `prepare_space` next.
"""
from __future__ import annotations

import sys
import time

from .config import SearchConfig, base_trial_config, has_auto_seeds

__all__ = ["prepare_space", "prepared_space"]


def prepare_space(cfg: SearchConfig, space, stream=None):
    """`space` (built by `SearchSpace.from_config(cfg)`) with what its config asks of the teacher: the prior's and
    the automatic seeds' damages (the real teacher and its calibration statistics, cached on disk) and the seed
    plans; a space whose config asks for none of it comes back as it is, marked prepared."""
    from .prior import needs_profile, search_damages, seed_kl_damages
    from .space import teacher_skeleton

    if getattr(space, "prepared", False):
        return space
    out = stream or sys.stderr
    t0 = time.time()
    what = [w for w, on in (("the teacher's sensitivity to every option", needs_profile(cfg)),
                            (f"{len(cfg.search.seed_plans)} seed plan(s)", bool(cfg.search.seed_plans))) if on]
    if what:
        print(f"preparing the space of {cfg.name}: {' and '.join(what)} ...", file=out, flush=True)
    if needs_profile(cfg):  # the real teacher and its calibration data, once, cached on disk
        space = space.with_damages(search_damages(cfg, space, stream=out))
        if cfg.search.seed_damage == "kl" and has_auto_seeds(cfg.search.seed_plans):
            space.seed_damages = seed_kl_damages(cfg, space, space.damages, stream=out)
    if cfg.search.seed_plans:
        evolve = None
        if cfg.search.seed_evolve is not None and has_auto_seeds(cfg.search.seed_plans):
            from .seed_evolution import seed_evolver

            s = cfg.search.seed_evolve
            print(f"evolving the automatic seeds on the model ({s.generations} generations x {s.offspring} "
                  "offspring each) ...", file=out, flush=True)
            evolve = seed_evolver(cfg, space, stream=out)
        space = space.with_seeds(cfg.search.seed_plans, teacher_skeleton(base_trial_config(cfg)),
                                 metric=cfg.size_metric, evolve=evolve)
    if what:
        print(f"prepared the space of {cfg.name} in {time.time() - t0:.1f} s"
              + (f": {len(space.seeds)} seed plan(s)" if cfg.search.seed_plans else ""), file=out, flush=True)
    space.prepared = True
    return space


def prepared_space(cfg: SearchConfig, stream=None):
    """`SearchSpace.from_config(cfg)`, then `prepare_space`: the space a search runs over."""
    from .space import SearchSpace

    return prepare_space(cfg, SearchSpace.from_config(cfg), stream)
