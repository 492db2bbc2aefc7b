"""The driver's work before a local Ray starts (the data once, the teacher reference) and the teacher reference
as a Ray task when the driver could not prepare (Ray already running, a cluster)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from kron.errors import UserError
from kron.fsutil import atomic_write_json
from kron.vocab import SUMMARY_NAME

from .config import SearchConfig
from analysis.textfmt import error_line, fmt_quality, human
from .trainable import threads_for

__all__ = ["REFERENCE_DIR", "prepare_locally", "run_teacher_reference"]

REFERENCE_DIR = "reference_teacher"


def _prepare_device(cfg: SearchConfig) -> str:
    """The device the workers will use: "auto" means the CPU when the trials get no GPU from Ray."""
    device = cfg.trial.device
    return "cpu" if device == "auto" and not cfg.search.resources.gpu else device


def prepare_locally(cfg: SearchConfig, local_dir: Path, stream=None) -> dict[str, float]:
    """Work done once in the driver before a local Ray starts; returns its timings (seconds).

    * the teacher and every stage's data are loaded here (`trials.trial.prepare_data`), so the on-disk caches of
      teacher samples and token blocks exist before the workers start; without this each fresh worker built the
      same data at the same time in its first trial (~4 s per worker for the quickstart's samples on one core);
    * the teacher reference (the uncompressed teacher evaluated on the same data, `search.reference`) is run here
      with the process caches just filled, instead of in a fresh Ray worker after the search (~5 s);
    with the trial's thread count and device, so the data and the reference are the ones a worker would produce.
    Bad data (a missing corpus, an encoder with teacher samples) is reported here, before Ray starts. The driver's
    copies of the teacher and data are dropped afterwards (on a GPU the driver keeps its CUDA context). The time
    counts towards `search.time_budget_minutes`.
    """
    import gc

    import torch

    from trials.inputs import clear_caches, prepare_data

    trial = cfg.trial
    device = _prepare_device(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads_for(cfg.search.resources.cpu))
    try:
        timings = prepare_data(trial, device=device)
        ref = local_dir / REFERENCE_DIR
        if cfg.search.reference and not (ref / SUMMARY_NAME).is_file():
            t0 = time.time()
            try:
                summary = _reference_task({**_reference_trial(cfg), "device": device}, str(ref))
            except UserError:
                raise
            except Exception as exc:  # the search's results stand on their own
                print(f"warning: the teacher reference evaluation failed: {error_line(exc)}", file=stream or sys.stderr)
            else:
                _write_reference(cfg, ref, summary, stream)
                timings["reference_s"] = time.time() - t0
    finally:
        torch.set_num_threads(threads)
        clear_caches()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return timings


def _reference_trial(cfg: SearchConfig) -> dict:
    """The trial config of the teacher reference: the teacher itself, every stage with max_steps 0."""
    trial = cfg.trial.model_dump(mode="json")
    trial.update(method="teacher", plan=None, name="teacher", save_checkpoint=False,
                 threads=threads_for(cfg.search.resources.cpu))
    for stage in ("stage1", "stage2"):
        if trial.get(stage) is not None:
            trial[stage] = {**trial[stage], "max_steps": 0}
    return trial


def _write_reference(cfg: SearchConfig, out: Path, summary: dict, stream=None) -> None:
    summary["search"] = cfg.name
    atomic_write_json(out / SUMMARY_NAME, summary)
    quality = fmt_quality(summary.get('quality'), '-', nonfinite=True)
    print(f"teacher reference: {summary.get('quality_name')} {quality}, "
          f"{human(summary.get('params'), '?')} params", file=stream or sys.stdout, flush=True)


def _reference_task(trial: dict, out_dir: str) -> dict:
    from trials.trial import run_trial

    return run_trial(trial, output_dir=out_dir, progress=False)


def run_teacher_reference(cfg: SearchConfig, local_dir: Path, stream=None) -> Path | None:
    """Evaluate the uncompressed teacher on the search's validation data (every stage with max_steps 0), as a Ray
    task with one trial's resources, into `<experiment>/reference_teacher/`. Skipped when it exists already (a
    resumed search); a failure is reported and ignored."""
    import ray

    out = local_dir / REFERENCE_DIR
    if (out / SUMMARY_NAME).is_file():
        return out
    r = cfg.search.resources
    task = ray.remote(_reference_task).options(num_cpus=r.cpu, num_gpus=r.gpu, max_retries=0)
    try:
        summary = ray.get(task.remote(_reference_trial(cfg), str(out)))
    except Exception as exc:  # the search's results stand on their own
        print(f"warning: the teacher reference evaluation failed: {error_line(exc)}", file=stream or sys.stderr)
        return None
    _write_reference(cfg, out, summary, stream)
    return out
