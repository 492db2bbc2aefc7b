"""lm-evaluation-harness on a model in memory: the zero-shot benchmarks papers report (ARC, HellaSwag, PIQA,
WinoGrande, ...) for a teacher, a compressed or a merged model.

The harness is an optional extra (`pip install "kronsearch[lm-eval]"`), imported only when a harness runs; without it
every entry point raises a one-line ConfigError saying how to install it. `run_harness` wraps the model object in
lm-eval's `HFLM` (no reload from disk, so a compressed model's Kronecker / low-rank / pruned modules are what is
scored) and returns each task's metrics as plain floats; `harness_quality` turns them into one higher-is-better
number, a trial's quality. Tasks come from lm-eval's own catalogue or from task YAMLs in `include_path` (local
files: the offline way; see docs/cli.md).
"""
from __future__ import annotations

import copy
import difflib
import functools
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path

from kron.errors import ConfigError, DataError, one_line

__all__ = ["INSTALL_HINT", "check_tasks", "harness_quality", "main_metric", "run_harness", "split_tasks"]

INSTALL_HINT = 'lm-evaluation-harness is not installed: pip install "kronsearch[lm-eval]"'
PREFERRED_METRICS = ("acc_norm", "acc")  # a task's main metric: the first of these it reports, else its first metric
# what HFLM logs every time it is handed a model object instead of a name: expected here, so not shown
_MODEL_OBJECT_NOTICES = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return lm_eval


def split_tasks(text: str | list[str]) -> list[str]:
    """Task names from "arc_easy,hellaswag" (or a list), stripped, in order, without repeats; ConfigError when none."""
    items = text.split(",") if isinstance(text, str) else list(text)
    tasks = list(dict.fromkeys(t.strip() for t in items if isinstance(t, str) and t.strip()))
    if not tasks:
        raise ConfigError(f"lm-eval: no task names in {text!r} (e.g. arc_easy,hellaswag,piqa,winogrande)")
    return tasks


@functools.lru_cache(maxsize=8)
def _manager(include_path: str | None, include_defaults: bool):
    # indexing lm-eval's ~15k task YAMLs takes ~15 s: one index per process and folder (a search worker reuses it)
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def check_tasks(tasks: list[str], include_path: str | None = None):
    """The lm-eval TaskManager that knows every name in `tasks` (groups and tags count); ConfigError naming the
    unknown ones, or when lm-eval is not installed. Tasks all found in `include_path` skip lm-eval's own catalogue
    (much faster to index)."""
    _lm_eval()
    folder = None
    if include_path is not None:
        path = Path(include_path).expanduser()
        if not path.exists():
            raise ConfigError(f"lm-eval include path {include_path!r} does not exist (a folder of task YAMLs)")
        folder = str(path.resolve())
        local = _manager(folder, False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = _manager(folder, True)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        where = f" or in {include_path}" if include_path is not None else ""
        raise ConfigError(f"unknown lm-eval task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
                          f"not in lm-eval's catalogue{where}{hint} (`lm-eval ls tasks` lists them)")
    return manager


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_MODEL_OBJECT_NOTICES)


@contextmanager
def _quiet_and_quick(evaluator):
    """Without HFLM's notices about model objects, and without the environment report simple_evaluate ends with
    (torch.utils.collect_env runs `pip list` and more in subprocesses: ~2 s of every call here, thrown away)."""
    logger, drop = logging.getLogger("lm_eval.models.huggingface"), _DropNotices()
    logger.addFilter(drop)
    env_info = getattr(evaluator, "add_env_info", None)
    if env_info is not None:
        evaluator.add_env_info = lambda results: None
    try:
        yield
    finally:
        logger.removeFilter(drop)
        if env_info is not None:
            evaluator.add_env_info = env_info


def run_harness(model, tokenizer, tasks: list[str] | str, *, limit: int | None = None, batch_size: int | str = 8,
                device=None, include_path: str | None = None, num_fewshot: int | None = None) -> dict:
    """Score `model` (a causal-LM transformers model, compressed or not, in memory) on lm-eval `tasks`.

    Args:
        tokenizer: the model's tokenizer (a copy is given to lm-eval, which may set its pad token).
        tasks: task, group or tag names of lm-eval ("arc_easy,hellaswag" or a list), or tasks in `include_path`.
        limit: the first N examples of each task (None: all; papers report all).
        batch_size: lm-eval's batch size (an int, or "auto").
        device: move the model there first (None: leave it where it is; lm-eval uses the model's own device).
        include_path: a folder (or file) of extra task YAMLs: local tasks, offline.
        num_fewshot: few-shot examples (None: each task's default, 0 for the tasks above).
    Returns {"lm_eval_version", "limit", "num_fewshot", "tasks": {task: {metric: float, ..., "samples": N}},
    "higher_is_better": {task: {metric: bool}}, "wall_time_s"}; metric names are lm-eval's without the ",none"
    filter suffix ("acc", "acc_norm", "acc_stderr", ...; other filters keep theirs: "exact_match,strict-match"), a
    value lm-eval could not compute (a stderr of one example) is None. Groups report their aggregate too.
    ConfigError: lm-eval missing, an unknown task, a model that is not a causal LM; DataError: a task's data could
    not be loaded (offline without a filled datasets cache).
    """
    tasks = split_tasks(tasks)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"lm-eval limit must be a positive number of examples per task, got {limit!r}")
    manager = check_tasks(tasks, include_path)
    from kron.models import is_causal_lm

    if not is_causal_lm(model):
        raise ConfigError(f"lm-eval scores causal language models; {type(model).__name__} is not one (a "
                          "...LMHeadModel / ...ForCausalLM is needed)")
    import lm_eval.evaluator  # installed: check_tasks said so
    from lm_eval.models.huggingface import HFLM

    if device is not None:
        model.to(device)
    was_training = model.training
    t0 = time.perf_counter()
    try:
        with _quiet_and_quick(lm_eval.evaluator):
            # HFLM takes any non-str `pretrained` as the model itself: it reads `.config` and `.device` (so `device`
            # and `dtype` arguments are ignored: the model is moved above, its dtype is its own), puts it in eval
            # mode and calls `tie_weights()`. A compressed model that factored the embedding was untied
            # (config.tie_word_embeddings false, kron.surgery), so that call leaves its LM head alone; one that kept
            # the embedding dense re-ties the head to the same tensor it already shares. backend="causal": our
            # models are decoder-only, and the config-based guess is not needed.
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), backend="causal", batch_size=batch_size)
            out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                          task_manager=manager, log_samples=False)
    except ConnectionError as exc:  # offline, a hub dataset not in the datasets cache
        raise DataError(f"lm-eval could not load the data of {', '.join(tasks)}: {one_line(exc)} (offline: fill the "
                        "datasets cache on a machine with network first, or use local task YAMLs; docs/cli.md)"
                        ) from None
    finally:
        model.train(was_training)
    return {"lm_eval_version": _version(), "limit": limit, "num_fewshot": num_fewshot,
            "tasks": {name: _task_metrics(entry, out.get("n-samples", {}).get(name))
                      for name, entry in out["results"].items()},
            "higher_is_better": {name: dict(v) for name, v in out.get("higher_is_better", {}).items()},
            "wall_time_s": round(time.perf_counter() - t0, 3)}


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def _task_metrics(entry: dict, samples: dict | None) -> dict:
    metrics: dict = {}
    for key, value in entry.items():
        if "," not in key:  # name, alias, sample_len
            continue
        metric, _, filt = key.partition(",")
        name = metric if filt == "none" else key
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        metrics[name] = float(number) if number is not None and math.isfinite(number) else None  # "N/A", NaN
    if samples:
        metrics["samples"] = int(samples.get("effective", samples.get("original", 0)))
    return metrics


def _metric_names(metrics: dict) -> list[str]:
    return [k for k in metrics if k != "samples" and "_stderr" not in k]


def main_metric(metrics: dict, metric: str | None = None, task: str = "task") -> tuple[str, float]:
    """(name, value) of a task's main metric in `run_harness`'s per-task dict: `metric` when given, else acc_norm
    where the task reports it, else acc, else its first metric; ConfigError when it has none (or not `metric`).
    A value lm-eval could not compute is NaN."""
    names = _metric_names(metrics)
    if metric is not None:
        if metric not in names:
            raise ConfigError(f"lm-eval task {task!r} reports no metric {metric!r}; it reports "
                              f"{', '.join(names) or 'none'}")
        name = metric
    else:
        name = next((m for m in PREFERRED_METRICS if m in names), names[0] if names else None)
        if name is None:
            raise ConfigError(f"lm-eval task {task!r} reported no metric")
    value = metrics[name]
    return name, math.nan if value is None else float(value)


def harness_quality(result: dict, tasks: list[str], metric: str | None = None) -> float:
    """The mean over `tasks` of each task's main metric (`main_metric`) in a `run_harness` result: one
    higher-is-better number. ConfigError for a task missing from the result or a main metric lm-eval marks as
    lower-is-better (a perplexity: rank by val perplexity instead)."""
    values = []
    for task in split_tasks(tasks):
        if task not in result["tasks"]:
            raise ConfigError(f"lm-eval reported no results for task {task!r}")
        name, value = main_metric(result["tasks"][task], metric, task)
        if result.get("higher_is_better", {}).get(task, {}).get(name) is False:
            raise ConfigError(f"lm-eval task {task!r}: its metric {name!r} is lower-is-better; a trial's lm_eval "
                              "quality must be higher-is-better (accuracy): pick another metric or task")
        values.append(value)
    return sum(values) / len(values)
