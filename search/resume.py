"""`search_meta.json` (what a search was started with) and the checks of `--resume`: the experiment exists, its
config fingerprint matches (locally or in a remote bucket), and which trials its saved state left unfinished."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kron.errors import CheckpointError, ConfigError
from kron.fsutil import atomic_write_json
from kron.vocab import META_NAME

from .config import SearchConfig, config_fingerprint

if TYPE_CHECKING:
    from .space import SearchSpace

__all__ = ["UNFINISHED", "adopt_saved_defaults", "check_remote_resume", "check_resume", "refuse_failed_restore",
           "saved_trial_states", "unfinished", "write_meta"]

UNFINISHED = ("RUNNING", "PENDING", "PAUSED")  # Ray trial states a resume runs (again)


def write_meta(cfg: SearchConfig, space: SearchSpace, local_dir: Path, *, extra: dict | None = None) -> Path:
    """`search_meta.json` at the experiment root: name, objectives with modes, method, the full config."""
    metrics, modes = cfg.objective_metrics()
    trial = cfg.trial
    meta = {
        "name": cfg.name,
        "objectives": [{"name": o, "metric": m, "mode": d} for o, m, d in zip(cfg.search.objectives, metrics, modes)],
        "quality_name": trial.quality_name,
        "method": f"kronsearch search: {cfg.search.algorithm} (Optuna via Ray Tune)"
                  + (f", ASHA grace {cfg.search.asha.grace_period} rf {cfg.search.asha.reduction_factor} max_t "
                     f"{cfg.asha_max_t}" if cfg.search.asha else ", no early stopping"),
        "space_size": str(space.size()),
        "space_size_log10": round(space.size_log10(), 3),
        "teacher": {"params": space.info.params,
                    "params_excl_output_embedding": space.info.params_excl_output_embedding,
                    "macs_per_token": space.info.macs, "model_type": space.info.model_type},
        "config": cfg.model_dump(mode="json"),
        "fingerprint": config_fingerprint(cfg),
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    meta.update(extra or {})
    return atomic_write_json(local_dir / META_NAME, meta)


def _versions() -> dict:
    out = {}
    for mod in ("ray", "optuna", "torch", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def check_resume(cfg: SearchConfig, local_dir: Path) -> None:
    """ConfigError unless `local_dir` holds an experiment whose search_meta.json fingerprint matches `cfg`."""
    if not any(local_dir.glob("experiment_state-*.json")):  # checked here too, so that no Ray starts for nothing
        raise ConfigError(f"--resume: nothing to resume at {local_dir} (no experiment state); run without "
                          "--resume to start the search")
    meta_path = local_dir / META_NAME
    if meta_path.is_file():
        _check_fingerprint(cfg, meta_path.read_bytes, str(meta_path))


def check_remote_resume(cfg: SearchConfig, uri: str) -> None:
    """The fingerprint check of `check_resume` against the search_meta.json in a remote experiment, if any."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    meta = f"{root}/{META_NAME}"
    try:
        if fs.get_file_info(meta).type != pyarrow.fs.FileType.File:
            return
    except OSError as exc:
        raise ConfigError(f"storage {uri!r} cannot be read: {exc}") from None

    def read() -> bytes:
        with fs.open_input_file(meta) as f:
            return f.read()

    _check_fingerprint(cfg, read, f"{uri.partition('?')[0]}/{META_NAME}")


def _check_fingerprint(cfg: SearchConfig, read, where: str) -> None:
    try:
        old = json.loads(read())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"--resume: {where} is truncated or corrupt ({exc}); it records the search's "
                              "config: restore it, or start a new search with --name") from None
    if not isinstance(old, dict):
        raise CheckpointError(f"--resume: {where} is corrupt (a JSON {type(old).__name__}, expected an object)")
    fp = _normalised(old.get("fingerprint"))
    new = json.loads(json.dumps(config_fingerprint(cfg)))
    if fp is not None and fp != new and fp.get("demo_teacher_release", 1) != new.get("demo_teacher_release", 1):
        raise ConfigError(f"--resume: the search {cfg.name!r} distilled release {fp.get('demo_teacher_release', 1)} "
                          f"of the bundled demo teacher; this kronsearch bundles release "
                          f"{new.get('demo_teacher_release', 1)} (retrained: kron/demo_teacher/MODEL_CARD.md), so its "
                          "trials would not be comparable; start a new search with --name (the old one's results "
                          "stay readable by kronsearch analyze)")
    if fp is not None and fp != new:
        legacy = _legacy_defaults_changed(old.get("fingerprint"), fp, new)
        if legacy:
            raise ConfigError(f"--resume: the search {cfg.name!r} was started by an earlier release, whose defaults "
                              f"were {' and '.join(legacy)}; this release's defaults differ, so set them in the "
                              "config to resume it as it was run, or start a new search with --name")
        changed = [k for k in ("trial", "space") if fp.get(k) != new.get(k)]
        changed += ["search.seed_plans"] if fp.get("seed_plans") != new.get("seed_plans") else []
        changed += ["search.seed_damage"] if fp.get("seed_damage") != new.get("seed_damage") else []
        changed += ["search.seed_embedding"] if fp.get("seed_embedding") != new.get("seed_embedding") else []
        changed += ["search.seed_evolve"] if fp.get("seed_evolve") != new.get("seed_evolve") else []
        changed += ["search.asha.rungs"] if fp.get("asha_rungs") != new.get("asha_rungs") else []
        raise ConfigError(f"--resume: the {' and '.join(changed)} section(s) of the config changed since the search "
                          f"{cfg.name!r} started; resume with the original config, or start a new search with --name")


def _normalised(fp):
    """A saved fingerprint as this release writes it: keys added to the space since (e.g. `prior`) take their
    defaults, so an unchanged old search does not look changed; but the defaults that changed what a search does
    (`space.methods`, the trials' init) take the values the old search ran with (`config.LEGACY_DEFAULTS`)."""
    if not isinstance(fp, dict) or not isinstance(fp.get("space"), dict):
        return fp
    from pydantic import ValidationError

    from .config import LEGACY_DEFAULTS, SpaceConfig

    fp = dict(fp)
    from .config import has_auto_seeds

    if has_auto_seeds(fp.get("seed_plans")) and "seed_damage" not in fp:  # written before seeds minimised KL
        fp["seed_damage"] = LEGACY_DEFAULTS["seed_damage"]
    if has_auto_seeds(fp.get("seed_plans")) and fp.get("seed_damage") == "kl" and "seed_embedding" not in fp:
        fp["seed_embedding"] = LEGACY_DEFAULTS["seed_embedding"]  # written before KL seeds could factor embeddings
    if "init" not in fp:  # written before searches defaulted to the data-aware init: its trials ran with svd
        trial = fp.get("trial") if isinstance(fp.get("trial"), dict) else {}
        if isinstance(fp.get("trial"), dict) and "init" not in trial:
            fp["trial"] = trial = {**trial, "init": LEGACY_DEFAULTS["init"]}  # as adopt_saved_defaults sets it
        init = trial.get("init")
        fp["init"] = init.get("method", "svd") if isinstance(init, dict) else (init or LEGACY_DEFAULTS["init"])
    space = dict(fp["space"])
    space.setdefault("methods", LEGACY_DEFAULTS["methods"])
    try:
        space = SpaceConfig.model_validate(space).model_dump(mode="json")
    except ValidationError:
        return fp  # not a space this release reads: compared as saved (and reported as changed)
    return {**fp, "space": json.loads(json.dumps(space))}


def adopt_saved_defaults(cfg: SearchConfig, stream=None) -> SearchConfig:
    """`cfg` for resuming a search an earlier release started: the defaults that changed what a search does
    (`space.methods` [kronecker], the trials' init svd, the automatic seeds' damage proxy and, for KL seeds, their
    embedding kept) take the values the search
    ran with, where the config does not set them. A search this release started, or none at all, gives `cfg` back
    unchanged."""
    import sys

    from .config import LEGACY_DEFAULTS

    raw = _meta_bytes(cfg)
    try:
        saved = json.loads(raw).get("fingerprint") if raw is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return cfg  # check_resume names the corrupt file
    if not isinstance(saved, dict) or not isinstance(saved.get("space"), dict):
        return cfg
    from .config import has_auto_seeds

    data = cfg.model_dump(mode="json")
    notes = []
    if (has_auto_seeds(saved.get("seed_plans")) and "seed_damage" not in saved
            and "seed_damage" not in cfg.search.model_fields_set):
        data["search"]["seed_damage"] = LEGACY_DEFAULTS["seed_damage"]
        notes.append(f"search.seed_damage {LEGACY_DEFAULTS['seed_damage']!r}")
    if (has_auto_seeds(saved.get("seed_plans")) and saved.get("seed_damage") == "kl"
            and "seed_embedding" not in saved and "seed_embedding" not in cfg.search.model_fields_set):
        data["search"]["seed_embedding"] = LEGACY_DEFAULTS["seed_embedding"]
        notes.append(f"search.seed_embedding {str(LEGACY_DEFAULTS['seed_embedding']).lower()}")
    if "init" not in saved and "methods" not in saved["space"] and "methods" not in cfg.space.model_fields_set:
        data["space"]["methods"] = list(LEGACY_DEFAULTS["methods"])
        notes.append(f"space.methods {LEGACY_DEFAULTS['methods']}")
    if "init" not in saved and "init" not in cfg.trial_section:
        data["trial"]["init"] = LEGACY_DEFAULTS["init"]
        notes.append(f"trial.init {LEGACY_DEFAULTS['init']!r}")
    if not notes:
        return cfg
    print(f"--resume: {cfg.name!r} was started by an earlier release; it continues with that release's defaults "
          f"({', '.join(notes)})", file=stream or sys.stderr)
    adopted = SearchConfig.model_validate(data)
    return adopted


def _meta_bytes(cfg: SearchConfig) -> bytes | None:
    """The experiment's search_meta.json (local folder or bucket), or None when there is none (yet)."""
    from .config import is_remote_storage
    from .storage import experiment_path

    path = experiment_path(cfg)
    try:
        if not is_remote_storage(cfg.search.storage):
            meta = Path(path) / META_NAME
            return meta.read_bytes() if meta.is_file() else None
        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(path)
        with fs.open_input_file(f"{root}/{META_NAME}") as f:
            return f.read()
    except (OSError, ValueError):
        return None


def _legacy_defaults_changed(saved, fp: dict, new: dict) -> list[str]:
    """The old defaults ("space.methods [kronecker]", "trial.init svd") a search written before they changed ran
    with and the resuming config no longer gets: set them explicitly to resume it. saved: the fingerprint as
    written; fp: `_normalised(saved)`."""
    if not isinstance(saved, dict):
        return []
    from .config import LEGACY_DEFAULTS, has_auto_seeds

    out = []
    if (has_auto_seeds(saved.get("seed_plans")) and "seed_damage" not in saved
            and new.get("seed_damage") != LEGACY_DEFAULTS["seed_damage"]):
        out.append(f"search.seed_damage {LEGACY_DEFAULTS['seed_damage']!r}")
    if (has_auto_seeds(saved.get("seed_plans")) and saved.get("seed_damage") == "kl" and "seed_embedding" not in saved
            and new.get("seed_embedding") != LEGACY_DEFAULTS["seed_embedding"]):
        out.append(f"search.seed_embedding {str(LEGACY_DEFAULTS['seed_embedding']).lower()}")
    if "init" in saved:
        return out
    space = saved.get("space") if isinstance(saved.get("space"), dict) else {}
    if "methods" not in space and new.get("space", {}).get("methods") != LEGACY_DEFAULTS["methods"]:
        out.append(f"space.methods {LEGACY_DEFAULTS['methods']}")
    if fp.get("init") != new.get("init"):
        out.append(f"trial.init {fp.get('init')!r}")
    return out


def saved_trial_states(local_dir: Path) -> dict[str, str]:
    """Trial folder -> status in the latest saved experiment state: what a resume will see. After Ctrl-C the
    in-memory trials read TERMINATED, but the saved state keeps the interrupted ones RUNNING (and resumes them)."""
    files = sorted(Path(local_dir).glob("experiment_state-*.json"))  # named by start time: the last is current
    if not files:
        return {}
    try:
        state = json.loads(files[-1].read_text())
        out = {}
        for trial_json, _ in state["trial_data"]:
            t = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
            out[f"trial_{t['trial_id']}"] = t["status"]
        return out
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return {}


def unfinished(local_dir: Path) -> bool:
    """Trials left running or pending: fit() returned early (Ctrl-C returns normally, see ray-tune notes)."""
    return any(s in UNFINISHED for s in saved_trial_states(local_dir).values())


# Ray Tune's TuneController catches any exception of its restore, logs it with this message and starts the
# experiment again from nothing (unless fail_fast, which would also end a search at its first failed trial).
_RAY_RESTORE_FAILED = "Failed to restore the run state."
_RAY_CONTROLLER_LOGGER = "ray.tune.execution.tune_controller"
_STATE_LOCALS = ("checkpoint_path", "most_recent_checkpoint", "newest_state_path", "path", "dirpath")


class _RestoreFailed(logging.Handler):
    """Turns Ray's logged restore failure into a CheckpointError raised where Ray logs it, before it restarts."""

    def __init__(self, where: str):
        super().__init__(logging.ERROR)
        self.where = where

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() != _RAY_RESTORE_FAILED:
            return
        exc = record.exc_info[1] if record.exc_info else None
        from kron.errors import one_line

        raise CheckpointError(
            f"--resume: the saved state {_failed_file(exc) or 'in ' + self.where} cannot be restored "
            f"({type(exc).__name__ if exc else 'error'}: {one_line(exc) if exc else 'see the log'}); nothing was "
            "started again. Restore the file from a backup, or start a new search with --name (the finished "
            "trials' summaries stay readable by `kronsearch analyze`)") from exc


def _failed_file(exc: BaseException | None) -> str | None:
    """The state file whose reading raised `exc`: the innermost frame holding a path of a file that exists."""
    tb, found = exc.__traceback__ if exc is not None else None, None
    while tb is not None:
        for name in _STATE_LOCALS:
            value = tb.tb_frame.f_locals.get(name)
            if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
                found = os.path.basename(os.fspath(value))
        tb = tb.tb_next
    return found


@contextlib.contextmanager
def refuse_failed_restore(where: str):
    """While active (around a resumed `Tuner.fit`), a state Ray cannot restore raises CheckpointError naming the
    file instead of letting Ray start the search again silently beside the old one."""
    handler = _RestoreFailed(where)
    log = logging.getLogger(_RAY_CONTROLLER_LOGGER)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
