"""Starting Ray the kronsearch way: a quiet, offline-friendly local Ray (or a connection to a cluster) whose
workers can import this source tree."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .config import SearchConfig, is_remote_storage

__all__ = ["RAY_ENV", "checkpoint_period_s", "init_local_ray", "ray_env", "ray_running", "set_checkpoint_period",
           "start_ray"]

# Environment for the driver and (inherited) local workers: quiet, offline-friendly Ray.
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",  # no token file, no warning on every init
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage reporting attempts
    "RAY_AIR_NEW_OUTPUT": "0",  # the legacy reporter honours verbose=0; our callback prints the progress
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # JSON + CSV loggers are added explicitly (no TensorBoard files)
    "TUNE_FUNCTION_THREAD_TIMEOUT_S": "30",  # time a reused actor waits for a stopped trial to reach a report
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "100",
    "TUNE_RESULT_BUFFER_LENGTH": "1",  # results reach the console as they happen, not in bursts
    "TOKENIZERS_PARALLELISM": "false",
}


def ray_env() -> None:
    """Set `RAY_ENV` in this process (values already set win); local workers inherit it."""
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)


def checkpoint_period_s(num_samples: int) -> float:
    """Seconds between saves of Ray Tune's experiment state for a search of `num_samples` trials: 2 s up to 100
    trials (a killed driver loses little), then num_samples / 50 s. Each save rewrites the state of every trial so
    far (~30 KB a trial), so a fixed period made the driver's saving time grow with the square of the trials: 35 ms
    a save after 50 trials, 179 ms after 200 on 2 busy cores (benchmarks/search_scale.py); growing the period with
    the search keeps saving near 5% of the driver's time at any size."""
    return max(2.0, num_samples / 50)


_PERIOD_SET: str | None = None  # the TUNE_GLOBAL_CHECKPOINT_S value set here (any other value is the user's)


def set_checkpoint_period(num_samples: int) -> None:
    """Set TUNE_GLOBAL_CHECKPOINT_S (read when the search's Tuner starts) to `checkpoint_period_s`, unless the user
    set it."""
    global _PERIOD_SET
    current = os.environ.get("TUNE_GLOBAL_CHECKPOINT_S")
    if current is not None and current != _PERIOD_SET:
        return
    _PERIOD_SET = f"{checkpoint_period_s(num_samples):g}"
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = _PERIOD_SET


def _repo_root_on_pythonpath() -> None:
    """Let local workers import kronsearch when it runs from a source tree that was never installed."""
    # this file's tree, not `search.__file__`: an editable install can make `search` a namespace package (no
    # __file__) when run from another directory
    root = str(Path(__file__).resolve().parents[1])
    if "site-packages" in root or "dist-packages" in root:
        return
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


def _ray_temp_dir(storage: str) -> str | None:
    """`<storage>/.ray` when the storage is local and that path is short enough for Ray's unix sockets."""
    if is_remote_storage(storage):
        return None
    path = Path(storage) / ".ray"
    # Ray's longest socket is <temp>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store (~64 chars past <temp>)
    return str(path) if len(str(path)) <= 40 else None


def init_local_ray(num_cpus: int | None = None, temp_dir: str | None = None) -> None:
    """Start a local Ray the kronsearch way: no dashboard, worker logs not forwarded, quiet, offline-friendly, and
    the source tree importable by the workers."""
    ray_env()
    import ray

    logging.getLogger("ray").setLevel(logging.WARNING)
    _repo_root_on_pythonpath()
    kwargs: dict[str, Any] = {"num_cpus": num_cpus or os.cpu_count(), "include_dashboard": False,
                              "log_to_driver": False, "logging_level": logging.WARNING}
    if temp_dir:
        Path(temp_dir).mkdir(parents=True, exist_ok=True)
        kwargs["_temp_dir"] = temp_dir
    ray.init(**kwargs)


def start_ray(cfg: SearchConfig) -> bool:
    """Start (or connect to) Ray unless it is running in this process already; returns True if started here."""
    ray_env()
    import ray

    if ray.is_initialized():
        return False
    s = cfg.search
    if s.address:
        logging.getLogger("ray").setLevel(logging.WARNING)
        ray.init(address=s.address, log_to_driver=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {k: v for k, v in RAY_ENV.items() if k.startswith(("TUNE_", "TOKEN"))}})
        return True
    init_local_ray(s.num_cpus, _ray_temp_dir(s.storage))
    return True


def ray_running() -> bool:
    """Whether this process is connected to a Ray already (a test session, a notebook)."""
    import ray

    return ray.is_initialized()
