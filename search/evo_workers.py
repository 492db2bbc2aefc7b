"""Measuring the plans of an evolutionary plan search (`kron.evo`) in parallel, on Ray actors.

Each worker is a Ray actor holding a copy of the model, the calibration statistics and the held-out batches, and a
`kron.refine.PlanEvaluator` of its own: every (matrix, candidate) layer a worker is asked for is built there once
(data-aware init) and kept, so after the first generations a measurement is one forward pass over the held-out
tokens. A batch of plans is split over the workers by affinity (`EvoWorkers.assign`: a plan goes where most of its
layers are built already, the batch still spread) and the KLs come back in the batch's order, so a seeded evolution
gives the same plans with 1 or n workers (the measure is deterministic: the same layers, the same tokens; float
sums may differ in the last bits between machines).

The model travels as an object (`ray.put`), not as a name to load again: a `config:` model has random weights, and
a loaded model may have been changed in memory. Memory: one model copy per worker (plus its built layers).
Workers use the device each one picks (`kron.models.pick_device`): a GPU where Ray gives them one
(`gpus_per_worker`), else the CPU.
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["EvoWorkers"]


def _worker_class():
    import ray

    @ray.remote
    class EvoWorker:
        """One measuring worker: a model copy and its PlanEvaluator."""

        def __init__(self, model, stats, heldout, token_levels, ridge):
            import torch

            from kron.models import pick_device
            from kron.refine import PlanEvaluator

            torch.set_num_threads(1)  # one core per worker: n workers on n cores, not n x n threads
            model = model.to(pick_device("auto")).eval()  # the measure moves the held-out batches to it
            self.evaluator = PlanEvaluator(model, stats, heldout, token_levels, ridge)

        def warm(self, choice) -> int:
            """Build the layers of `choice` (an evolution's start: every later plan shares most of them)."""
            for name, option in choice.items():
                if option.spec != "keep":
                    self.evaluator.layer(name, option)
            return len(self.evaluator.built)

        def measure(self, choices: list, level: int) -> list[float]:
            return [self.evaluator(c, level) for c in choices]

        def counts(self) -> dict:
            ev = self.evaluator
            return {"evals_per_level": list(ev.evals_per_level), "tokens_per_level": list(ev.tokens_per_level),
                    "layers_built": len(ev.built)}

    return EvoWorker


class EvoWorkers:
    """`workers` Ray actors measuring plans; `evaluate_many` is the hook `kron.evo.evolve_plan` takes. Starts a local
    Ray (one CPU per worker) unless Ray is running in this process; `close()` ends the actors, and Ray if it was
    started here. Use as a context manager."""

    def __init__(self, model, stats, heldout: Sequence, token_levels: Sequence[int | None], ridge: float | None,
                 workers: int, *, gpus_per_worker: float = 0.0):
        from kron.errors import ConfigError

        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"--evo-workers takes a number of workers >= 1, got {workers!r}")
        from .raystart import init_local_ray, ray_env

        ray_env()
        import ray

        self.started = not ray.is_initialized()
        if self.started:
            init_local_ray(num_cpus=workers)
        cls = _worker_class().options(num_cpus=1, num_gpus=gpus_per_worker)
        first = next(iter(model.parameters()), None)
        if first is not None and first.device.type != "cpu":  # a CPU copy travels; the caller's model stays put
            import copy

            model = copy.deepcopy(model).cpu()
        refs = [ray.put(x) for x in (model, stats, list(heldout))]
        self.workers = [cls.remote(*refs, list(token_levels), ridge) for _ in range(workers)]
        self.held: list[set] = [set() for _ in range(workers)]  # (matrix, candidate) layers each worker has built

    def assign(self, choices: list) -> list[int]:
        """The worker of each plan: the one that would finish it first, counting as work the layers it would have to
        build and the plans it measures (this batch's included), so that a layer is built on as few workers as the
        batch allows and the batch is still spread. Deterministic."""
        load = [0] * len(self.workers)  # work given in this batch: layers to build + plans to measure
        out = []
        for choice in choices:
            need = {(n, o.label) for n, o in choice.items() if o.spec != "keep"}
            w = min(range(len(self.workers)), key=lambda k: (load[k] + len(need - self.held[k]) + 1, k))
            load[w] += len(need - self.held[w]) + 1
            self.held[w] |= need
            out.append(w)
        return out

    def evaluate_many(self, choices: list, level: int) -> list[float]:
        """One KL per plan, in the order given."""
        import ray

        if choices:  # a worker that has built nothing builds the first plan's layers first (in parallel): else the
            # start's layers live on one worker and every child goes there, or waits on the others' builds
            for k in [k for k in range(len(self.workers)) if not self.held[k]]:
                self.workers[k].warm.remote(choices[0])  # an actor runs its calls in order: measures wait for it
                self.held[k] |= {(n, o.label) for n, o in choices[0].items() if o.spec != "keep"}
        where = self.assign(choices)
        parts = [[i for i, w in enumerate(where) if w == k] for k in range(len(self.workers))]
        futures = [(idx, self.workers[k].measure.remote([choices[i] for i in idx], level))
                   for k, idx in enumerate(parts) if idx]
        out: list = [None] * len(choices)
        for idx, fut in futures:
            for i, value in zip(idx, ray.get(fut)):
                out[i] = value
        return out

    def counts(self) -> dict:
        """Measurements, tokens and built layers, summed over the workers."""
        import ray

        per = ray.get([w.counts.remote() for w in self.workers])
        levels = len(per[0]["evals_per_level"]) if per else 0
        return {"workers": len(per),
                "evals_per_level": [sum(p["evals_per_level"][k] for p in per) for k in range(levels)],
                "tokens_per_level": [sum(p["tokens_per_level"][k] for p in per) for k in range(levels)],
                "layers_built": sum(p["layers_built"] for p in per)}

    def close(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self.started:
            ray.shutdown()
            self.started = False

    def __enter__(self) -> "EvoWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
