"""Experiment trackers of a search (`search.loggers`): Ray Tune's own logger callbacks for TensorBoard, MLflow and
Weights & Biases, checked in the driver before Ray starts.

Every tracker gets each trial's parameters — Ray Tune's `config`: the sampled plan parameters plus the plan's
one-line summary and its sizes (`plan_*` keys, added by `search.searcher.PlanSearcher.suggest`) — and every
evaluation's metrics as the trainable reports them (`quality`, `eval_quality`, every ILKD loss term `loss_*`,
throughput and latency, sizes, steps).

* tensorboard: `ray.tune.logger.TBXLoggerCallback`, event files in each trial's folder
  (`tensorboard --logdir <storage>/<name>`); the default when tensorboardX is importable.
* mlflow: `ray.air.integrations.mlflow.MLflowLoggerCallback`, one MLflow run per trial in the experiment named
  after the search; by default a file store inside the run folder (`<run>/mlruns`, no server), or the tracking
  server/database of `MLFLOW_TRACKING_URI` when that is set. Extra: `pip install 'kronsearch[mlflow]'`.
* wandb: `ray.air.integrations.wandb.WandbLoggerCallback`, offline runs in `<run>/wandb` (no network, no API key;
  `wandb sync` uploads them later), unless `WANDB_MODE` says otherwise. Extra: `pip install 'kronsearch[wandb]'`.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

from kron.errors import ConfigError

__all__ = ["LOGGERS", "check_loggers", "default_loggers", "logger_callbacks", "mlflow_uri", "resolve_loggers"]

# logger name -> (module it needs, the pip extra that installs it)
LOGGERS: dict[str, tuple[str, str | None]] = {
    "tensorboard": ("tensorboardX", None),  # a dependency of ray[tune]
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
}
MLFLOW_DIR = "mlruns"
WANDB_DIR = "wandb"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def default_loggers() -> list[str]:
    """`search.loggers` when the config does not say: TensorBoard when tensorboardX is importable, else none."""
    return ["tensorboard"] if _importable("tensorboardX") else []


def resolve_loggers(loggers: list[str] | None) -> list[str]:
    return default_loggers() if loggers is None else list(loggers)


def mlflow_uri(local_dir: Path) -> str:
    """MLFLOW_TRACKING_URI when set, else the file store `<run>/mlruns`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or Path(local_dir).resolve().joinpath(MLFLOW_DIR).as_uri()


def _writable(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".kronsearch-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(f"search.loggers: {what} cannot write to {path}: {exc.strerror or exc}") from None


def check_loggers(loggers: list[str], local_dir: Path) -> None:
    """ConfigError, before Ray starts, when a tracker's package is missing (naming the pip extra) or its
    directory under the run folder cannot be written."""
    for name in loggers:
        module, extra = LOGGERS[name]
        if not _importable(module):
            how = f"pip install 'kronsearch[{extra}]'" if extra else f"pip install {module}"
            raise ConfigError(f"search.loggers: {name!r} needs the {module} package, which is not installed: {how} "
                              f"(or remove {name!r} from search.loggers)")
    local_dir = Path(local_dir)
    if "tensorboard" in loggers:
        _writable(local_dir, "tensorboard")
    if "mlflow" in loggers and not os.environ.get("MLFLOW_TRACKING_URI"):
        _writable(local_dir / MLFLOW_DIR, "mlflow")
    if "wandb" in loggers:
        _writable(local_dir / WANDB_DIR, "wandb")


def logger_callbacks(loggers: list[str], name: str, local_dir: Path) -> list:
    """Ray Tune callbacks for `loggers` (names of LOGGERS) of the search `name` whose run folder is `local_dir`."""
    callbacks = []
    local_dir = Path(local_dir).resolve()
    for logger in loggers:
        if logger == "tensorboard":
            from ray.tune.logger import TBXLoggerCallback

            callbacks.append(TBXLoggerCallback())
        elif logger == "mlflow":
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            if not os.environ.get("MLFLOW_TRACKING_URI"):
                # MLflow 3 keeps the file store only on request; it needs no server, database or network
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            callbacks.append(MLflowLoggerCallback(tracking_uri=mlflow_uri(local_dir), experiment_name=name,
                                                  tags={"kronsearch.search": name}, save_artifact=False))
        elif logger == "wandb":
            from ray.air.integrations.wandb import WandbLoggerCallback

            # Ray skips its API-key check only for WANDB_MODE=offline|disabled in the driver's environment
            mode = os.environ.setdefault("WANDB_MODE", "offline")
            callbacks.append(WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT") or "kronsearch",
                                                 group=name, mode=mode, dir=str(local_dir / WANDB_DIR)))
    return callbacks
