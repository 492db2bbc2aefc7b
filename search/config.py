"""Search configuration (YAML): what to search (`space`), over which trial (`trial`), and how (`search`).

    name: quickstart
    trial:   {teacher: demo, data: {...}, stage1: {...}}     # a TrialConfig without `plan`
    space:   {groups: [attention, ffn_in, ffn_out], layers: free, ranks: [1], budget: {max_params: 2e6}}
    search:  {algorithm: tpe, num_samples: 8, max_concurrent: 2, objectives: [quality, params], asha: {...}}

Everything is validated here, before Ray starts: unknown keys, wrong types and impossible values raise
`ConfigError` naming the field, the value and what would be valid. Model-dependent checks (does every group
match a module, can any plan meet the budget) happen when `search.space.SearchSpace` is built from this config.
Relative paths (teacher directory, data sources, storage) are resolved against the current directory, because
Ray runs each trial in its own working directory.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_serializer, field_validator, model_validator

from kron.errors import ConfigError, one_line
from kron.vocab import DEMO, DEMO_TEACHER_RELEASE, GROUPS, OBJECTIVES, SIZE_AXES, SIZE_OBJECTIVES
from trials.config import TrialConfig, join_problems, read_yaml_mapping, shown_value

from .space_config import BudgetConfig, LayerCount, PriorConfig, SpaceConfig, Strict  # noqa: F401 (re-exported)

__all__ = [
    "GROUPS",
    "OBJECTIVES",
    "AshaConfig",
    "BudgetConfig",
    "LayerCount",
    "ResourcesConfig",
    "SearchConfig",
    "SearchSettings",
    "SpaceConfig",
    "base_trial_config",
    "load_search_config",
    "smoke_config",
]

# GROUPS and OBJECTIVES (objective -> result column, direction, label) are the shared vocabulary of kron.vocab;
# re-exported here for search.space, which imports GROUPS from this module.


# The defaults of this release that change what a search does: every linear matrix may be Kronecker or low-rank,
# and every trial's factors get the data-aware init. Searches started by 0.1.0 ran with ["kronecker"] and "svd":
# `search.resume.adopt_saved_defaults` resumes them with those (and says so).
DEFAULT_SEARCH_INIT = "data"
LEGACY_DEFAULTS = {"methods": ["kronecker"], "init": "svd", "seed_damage": "proxy", "seed_embedding": False}


class AshaConfig(Strict):
    """Asynchronous successive halving on the trial's `quality` (Ray Tune's ASHAScheduler)."""

    grace_period: int = Field(10, ge=1, description="steps before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, ge=1, description="default: the final stage's max_steps")
    size_buckets: int = Field(3, ge=1, le=20, description="run ASHA separately within this many size strata (log "
                                                          "scale, cheapest plan to teacher), so small plans compete "
                                                          "with small plans; 1 = plain ASHA")
    protect_seeds: bool = Field(True, description="seed plans (search.seed_plans) are never stopped early: they run "
                                                  "to max_t, and their results still count in ASHA's rungs, so "
                                                  "sampled trials must match them to go on; false: ASHA stops seeds "
                                                  "like sampled trials")
    rungs: list[int] | None = Field(None, min_length=2, description="explicit budgets (training steps) at which "
                                   "trials are judged, increasing, the last the top budget every front plan is "
                                   "trained to (e.g. [60, 200, 600]); replaces grace_period and max_t's geometric "
                                   "rungs")
    promote: float | None = Field(None, gt=0, lt=1, description="the share of a rung's trials that go on to the "
                                                               "next (1 / reduction_factor; e.g. 0.33)")
    keep_front: bool = Field(True, description="a trial whose (quality, size) at a step is on the Pareto front of "
                                               "every result reported at that step is not stopped (ASHA ranks by "
                                               "quality within a size stratum and would stop a plan that extends the "
                                               "front); false: plain ASHA decisions")


    @field_validator("rungs")
    @classmethod
    def _rungs(cls, v):
        if v is not None and (any(r < 1 for r in v) or any(a >= b for a, b in zip(v, v[1:]))):
            raise ValueError(f"rungs must be positive and increasing (the last the top budget), got {v}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _explicit(cls, data):
        """rungs set grace_period (the first) and max_t (the last); promote sets reduction_factor = 1 / promote."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        rungs, promote = data.get("rungs"), data.get("promote")
        if isinstance(rungs, list) and len(rungs) >= 2 and all(isinstance(r, int) for r in rungs):
            for key, implied in (("grace_period", rungs[0]), ("max_t", rungs[-1])):
                if data.get(key) is not None and data[key] != implied:
                    raise ValueError(f"{key} {data[key]} contradicts rungs {rungs} (whose first is the grace period "
                                     "and last the top budget): give one of the two")
                data[key] = implied
        if isinstance(promote, (int, float)) and not isinstance(promote, bool) and 0 < promote < 1:
            rf = data.get("reduction_factor")
            if rf is not None and abs(float(rf) * promote - 1) > 1e-9:
                raise ValueError(f"promote {promote} contradicts reduction_factor {rf} (promote = 1 / "
                                 "reduction_factor): give one of the two")
            data["reduction_factor"] = 1.0 / promote
        return data


class ResourcesConfig(Strict):
    cpu: float = Field(1.0, gt=0, description="CPUs per trial (also its torch threads, rounded down, >= 1)")
    gpu: float = Field(0.0, ge=0, description="GPUs per trial; fractions (0.5) share a GPU")


class SeedEvolveConfig(Strict):
    """`search.seed_evolve`: the automatic seeds (seed_plans: auto, auto:N, auto@TARGET) evolved on the model before
    the search starts (`search.seed_evolution`, `kron.evo`): each seed's knapsack plan, over the space's own choices,
    improved by (1+λ) generations judged by the whole compressed teacher's KL on the held-out calibration tokens."""

    generations: int = Field(20, ge=1, description="generations per seed")
    offspring: int = Field(12, ge=1, description="children per generation (the best quarter re-measured on more "
                                                 "tokens)")
    tokens: list[int] = Field(default_factory=lambda: [512, 4096], min_length=1,
                              description="held-out tokens per measurement at each selection step, increasing "
                                          "(at most what the calibration holds out: 1/8 of its tokens)")
    seed: int = Field(0, description="the random seed of the switches")

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, v: list[int]) -> list[int]:
        if any(t < 1 for t in v) or any(a >= b for a, b in zip(v, v[1:])):
            raise ValueError(f"tokens must be positive and increasing, got {v}")
        return v


class SearchSettings(Strict):
    algorithm: Literal["tpe", "nsga2", "random"] = "tpe"
    num_samples: int = Field(16, ge=1, description="trials to run (plans over the budget do not count)")
    max_concurrent: int = Field(2, ge=1)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    seed: int = 0
    time_budget_minutes: float | None = Field(None, gt=0, description="wall-clock limit of the whole search, preparation and Ray start-up "
                                               "included; running trials are stopped when it is reached")
    objectives: list[str] = Field(default_factory=lambda: ["quality", "params"])
    asha: AshaConfig | None = Field(default_factory=AshaConfig, description="null: no early stopping")
    storage: str = Field("runs", description="experiment parent: a local path or a pyarrow URI (s3://, gs://)")
    address: str | None = Field(None, description="null: start a local Ray; 'auto' or 'ray://host:10001'")
    num_cpus: int | None = Field(None, ge=1, description="local Ray only: CPUs Ray may use (default: all)")
    startup_trials: int | None = Field(None, ge=1, description="TPE: random trials before modelling "
                                                               "(default: num_samples/4, between 2 and 10)")
    population_size: int | None = Field(None, ge=2, description="NSGA-II population (default: max_concurrent*4, "
                                                                ">= 4)")
    max_resamples: int = Field(200, ge=1, description="tries to draw a plan within the budget before repairing one")
    reference: bool = Field(True, description="also evaluate the uncompressed teacher on the same data (no "
                                              "training): a reference point in the results and the Pareto plot")
    seed_plans: list[str] = Field(default_factory=list,
                                  description="plans evaluated first, as trials of the search: presets (kngpt2, "
                                              "uniform:2, lowrank:2, ...), plan files, auto / auto:N (automatic "
                                              "plans spread over the size range) or auto@TARGET (one automatic "
                                              "plan at a size on the search's size axis, 3.5M, or at a preset's or "
                                              "plan file's size: auto@lowrank:2)")
    seed_damage: Literal["kl", "proxy"] = Field(
        "kl", description="what the automatic seed plans (seed_plans: [auto]) minimise summed over matrices: kl (the "
                          "teacher's KL with each matrix compressed alone, measured for 4 options per matrix on "
                          "held-out calibration tokens and interpolated along the proxy for the others; default) or "
                          "proxy (the relative output error of each matrix, as releases before this one did)")
    seed_embedding: bool = Field(
        True, description="with seed_damage kl: the automatic seeds may factor the embedding too (the teacher's KL "
                          "with the embedding alone factored is measured for each of its options; they are data-free, "
                          "as in trials). false: seeds keep the embedding's mildest option, as releases before this "
                          "one did")
    seed_evolve: SeedEvolveConfig | None = Field(
        None, description="evolve the automatic seeds on the model before the search (true: the defaults; a mapping: "
                          "generations, offspring, tokens, seed); null: the knapsack's plans, as before")
    loggers: list[str] | None = Field(None, description="experiment trackers fed by Ray Tune's logger callbacks: "
                                      "tensorboard, mlflow, wandb (null: tensorboard when tensorboardX is "
                                      "importable; []: none)")

    @field_validator("seed_evolve", mode="before")
    @classmethod
    def _seed_evolve(cls, v):
        if v is True:
            return {}
        return None if v is False else v

    @model_validator(mode="after")
    def _evolve_needs_auto(self):
        if self.seed_evolve is not None and not has_auto_seeds(self.seed_plans):
            raise ValueError("search.seed_evolve evolves the automatic seed plans: add auto, auto:N or auto@TARGET "
                             "to search.seed_plans, or remove seed_evolve")
        return self

    @field_validator("seed_plans")
    @classmethod
    def _seed_sizes(cls, v: list[str]) -> list[str]:
        from kron.budget import parse_number

        for name in v:
            m = AUTO_AT.fullmatch(name.strip())
            size = parse_number(m.group(1)) if m is not None else None
            if size is not None and not (1 <= size < 2**63):
                raise ValueError(f"{name!r}: an automatic plan's size must be a finite number of at least 1")
        return v

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str) -> str:
        if "://" in v and not v.startswith("file://"):
            return v
        path = Path(v.removeprefix("file://")).expanduser()
        for p in (path, *path.parents):  # the folder itself, or the nearest part of it that exists
            if p.exists():
                if not p.is_dir():
                    raise ValueError(f"storage {v!r}: {p} exists and is not a directory; give a folder to hold the "
                                     "experiment (or an s3:// / gs:// URI)")
                break
        return v

    @field_validator("loggers")
    @classmethod
    def _loggers(cls, v: list[str] | None) -> list[str] | None:
        from .tracking import LOGGERS

        if v is None:
            return v
        unknown = [name for name in v if name not in LOGGERS]
        if unknown:
            raise ValueError(f"unknown logger(s) {unknown}; valid: {list(LOGGERS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"loggers listed twice: {v}")
        return v

    @property
    def logger_names(self) -> list[str]:
        """`loggers`, or the default (tensorboard when tensorboardX is importable) when not given."""
        from .tracking import resolve_loggers

        return resolve_loggers(self.loggers)

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: list[str]) -> list[str]:
        unknown = [o for o in v if o not in OBJECTIVES]
        if unknown:
            raise ValueError(f"unknown objective(s) {unknown}; valid: {list(OBJECTIVES)}")
        if len(set(v)) != len(v):
            raise ValueError(f"objectives listed twice: {v}")
        if "quality" not in v:
            raise ValueError(f"objectives must include 'quality', got {v}")
        sizes = [o for o in v if o != "quality"]
        if not 1 <= len(sizes) <= 2:
            raise ValueError(f"give quality plus one or two size objectives from {list(SIZE_OBJECTIVES)} "
                             f"(e.g. [quality, params] or [quality, params, macs]), got {v}")
        return v

    @field_validator("address")
    @classmethod
    def _address(cls, v):
        if v is None or v == "auto" or v.startswith("ray://") or re.fullmatch(r"[\w.-]+:\d+", v):
            return v
        raise ValueError("address must be null (local Ray), 'auto', 'ray://host:port' or 'host:port'")


class SearchConfig(Strict):
    """A search config, validated once when it is built.

    `trial` is the typed base trial (a TrialConfig with an empty placeholder plan: the search fills in each trial's
    plan); `trial_section` is the `trial:` mapping as written (after paths were made absolute), which is what
    `model_dump`, `search_meta.json` and `config_fingerprint` record, so that they stay as earlier releases wrote
    them and `--resume` keeps working across releases.
    """

    name: str = Field(description="experiment name: the folder under `search.storage`")
    trial: TrialConfig = Field(description="the base trial (TrialConfig keys, without `plan`)")
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    search: SearchSettings = Field(default_factory=SearchSettings)
    _trial_section: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", v):
            raise ValueError("name must be 1-100 characters of letters, digits, '_', '.', '-' (it names a folder)")
        return v

    @model_validator(mode="wrap")
    @classmethod
    def _keep_trial_section(cls, data, handler):
        section = data.get("trial") if isinstance(data, dict) else None
        self = handler(data)
        if isinstance(section, dict):
            self._trial_section = copy.deepcopy(section)
        elif isinstance(data, SearchConfig):
            self._trial_section = copy.deepcopy(data._trial_section)
        else:  # built from a TrialConfig: its fields that were set, as a section would give them
            self._trial_section = self.trial.model_dump(mode="json", exclude_unset=True, exclude={"plan"})
        return self

    @field_validator("trial", mode="before")
    @classmethod
    def _trial(cls, v):
        if isinstance(v, dict):
            return _trial_from_section(v)  # raises ValueError with "trial.<field>: ..." messages
        if isinstance(v, TrialConfig):
            return _trial_from_section(v.model_dump(mode="json", exclude_unset=True, exclude={"plan"}))
        raise ValueError("Input should be a valid dictionary")  # the message pydantic gives a dict field

    @field_serializer("trial")
    def _dump_trial(self, trial: TrialConfig) -> dict[str, Any]:
        return copy.deepcopy(self._trial_section)

    @property
    def trial_section(self) -> dict[str, Any]:
        """A copy of the `trial:` mapping as written (TrialConfig keys, no `plan`): the base of each trial's config."""
        return copy.deepcopy(self._trial_section)

    @model_validator(mode="after")
    def _cross(self):
        trial = self.trial
        if self.search.asha is not None and trial.lm_eval is not None:
            raise ValueError("search.asha stops trials on their quality so far, but with trial.lm_eval the quality "
                             "is a harness score measured only at a trial's end; set search.asha: null")
        if self.search.asha is not None:
            final = trial.stage2 if trial.stage2 is not None else trial.stage1
            max_t = self.search.asha.max_t or final.max_steps
            if max_t < 1:
                raise ValueError("search.asha: the final stage has max_steps 0, nothing to schedule; set asha: null")
            rungs = self.search.asha.rungs
            if rungs is not None and rungs[-1] > final.max_steps:
                raise ValueError(f"search.asha.rungs: the top rung {rungs[-1]} is beyond the final stage's max_steps "
                                 f"{final.max_steps}, so no trial would reach it; raise max_steps to {rungs[-1]} or "
                                 "lower the rungs")
            if self.search.asha.grace_period > max_t:
                raise ValueError(f"search.asha.grace_period {self.search.asha.grace_period} exceeds max_t {max_t} "
                                 "(the final stage's max_steps): no trial could ever be stopped early")
        if self.search.resources.gpu > 0 and trial.device == "cpu":
            raise ValueError("search.resources.gpu > 0 but trial.device is 'cpu'")
        return self

    # ------------------------------------------------------------------------------------------- derived

    @property
    def final_stage(self) -> str:
        """The stage whose quality the search ranks: "glue" when there is a second stage, else "lm"."""
        return "glue" if self.trial.stage2 is not None else "lm"

    @property
    def final_stage_steps(self) -> int:
        final = self.trial.stage2 if self.trial.stage2 is not None else self.trial.stage1
        return final.max_steps

    @property
    def asha_max_t(self) -> int | None:
        if self.search.asha is None:
            return None
        return self.search.asha.max_t or self.final_stage_steps

    def quality_mode(self) -> str:
        return self.trial.quality_mode

    def objective_metrics(self) -> tuple[list[str], list[str]]:
        """(metric names reported to Ray, modes) in the order of `search.objectives`."""
        q_mode = self.quality_mode()
        metrics, modes = [], []
        for o in self.search.objectives:
            metrics.append(OBJECTIVES[o].column)
            modes.append(OBJECTIVES[o].mode or q_mode)
        return metrics, modes

    @property
    def size_metric(self) -> str:
        """The result column of the first size objective when it is known before training (params,
        params_excl_output_embedding, macs_per_token); "params" for latency, which is only measured."""
        metric = next(m for m in self.objective_metrics()[0] if m != "quality")
        return metric if metric in SIZE_AXES else "params"


_PLACEHOLDER_PLAN = {"rules": []}


def with_search_defaults(trial: dict) -> dict:
    """A `trial:` section with the defaults a search gives its trials: the data-aware init unless `init` is set."""
    return trial if "init" in trial else {**trial, "init": DEFAULT_SEARCH_INIT}


def base_trial_config(cfg: SearchConfig | dict) -> TrialConfig:
    """The `trial` section as a TrialConfig (with an empty placeholder plan); ValueError on any problem.

    For a SearchConfig this is `cfg.trial`, validated when the config was built (the same object every call: do not
    modify it); a dict is validated here.
    """
    if isinstance(cfg, SearchConfig):
        return cfg.trial
    return _trial_from_section(cfg)


def _trial_from_section(trial: dict) -> TrialConfig:
    if "plan" in trial:
        raise ValueError("trial.plan: the search chooses the plan; remove `plan` from the trial section")
    if trial.get("reference"):
        raise ValueError("trial.reference: a search's trials are its samples, not reference points; run hand-made "
                         "plans as seed_plans or as separate trials")
    method = trial.get("method", "kronecker")
    if method != "kronecker":
        raise ValueError(f"trial.method: a search compresses with method 'kronecker', got {method!r}")
    try:
        return TrialConfig.model_validate({**with_search_defaults(trial), "plan": copy.deepcopy(_PLACEHOLDER_PLAN)})
    except ValidationError as exc:
        raise ValueError(format_errors(exc, "", root=TrialConfig, prefix="trial.")) from None


# ----------------------------------------------------------------------------------------------- loading

def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class reached by following `loc` (field names) from `root`, or None."""
    import typing

    model = root
    for key in loc:
        if model is None or not isinstance(key, str) or key not in model.model_fields:
            return None
        ann = model.model_fields[key].annotation
        candidates = [ann, *typing.get_args(ann)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model


def format_errors(exc: ValidationError, where: str, *, root: type[BaseModel] | None = None,
                   prefix: str = "") -> str:
    """One "<where>: <field.path>: <problem> (got <value>)" per problem; unknown keys list the valid ones."""
    root = root or SearchConfig
    head = f"{where}: " if where else ""
    lines = []
    for err in exc.errors(include_url=False):
        # pydantic names union members in the location ("layers.LayerCount"); keep the real field names only
        loc = tuple(p for p in err["loc"] if isinstance(p, int) or not (p[:1].isupper() or "[" in p or "'" in p))
        field = prefix + (".".join(str(p) for p in loc) or "(top level)")
        msg = err["msg"].removeprefix("Value error, ")
        if msg.startswith("trial."):  # already formatted by the trial section's own validation
            lines.append(head + msg)
            continue
        if err["type"] == "extra_forbidden":
            model = _model_at(root, loc[:-1])
            valid = f"; valid keys: {', '.join(model.model_fields)}" if model is not None else ""
            lines.append(f"{head}{field}: unknown key{valid}")
            continue
        if err["type"] == "missing":
            lines.append(f"{head}{field}: required field missing")
            continue
        lines.append(f"{head}{field}: {one_line(msg)} (got {shown_value(err.get('input'))})")
    # a union (layers) reports one error per member: keep the distinct lines only
    return join_problems(list(dict.fromkeys(lines)))


def load_search_config(src: str | os.PathLike | dict | SearchConfig, *, overrides: dict | None = None,
                       smoke: bool = False) -> SearchConfig:
    """Read and validate a search config (YAML path, dict or SearchConfig); ConfigError on any problem.

    overrides: dotted keys set after reading, e.g. {"search.num_samples": 4, "name": "try2"} (CLI flags).
    smoke: shrink everything (a few tiny steps, two trials) for a quick end-to-end check; see `smoke_config`.
    Relative local paths in the trial (teacher directory, data and GLUE sources, lm_eval include path) and the
    storage path are made absolute against the current directory.
    """
    where = "search config"
    if isinstance(src, SearchConfig):
        data = src.model_dump(mode="json")
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        where = str(path)
        data = read_yaml_mapping(path, "search settings (keys name, trial, space, search)")
    else:
        data = copy.deepcopy(dict(src))
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: cannot set {key}: {p} is not a mapping")
        node[last] = value
    if smoke:
        data = smoke_config(data)
    if isinstance(data.get("trial"), dict):
        data["trial"] = _absolute_paths(data["trial"], where)
    search = data.get("search")
    if isinstance(search, dict) and isinstance(search.get("storage"), str):
        search["storage"] = _absolute_storage(search["storage"])
    try:
        return SearchConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, where)) from None


def _looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value in (".", "..") or os.path.exists(value)


def _absolute_paths(trial: dict, where: str) -> dict:
    """Make local paths absolute (Ray runs trials in their own folders); a path-like value that does not exist
    is an error now rather than in every trial."""
    trial = copy.deepcopy(trial)

    def fix(container: dict, key: str, field: str, keep: tuple[str, ...] = ()):
        value = container.get(key)
        if not isinstance(value, str) or value in keep or value.startswith("config:"):
            return
        if not _looks_local(value):
            return  # a hub name
        path = Path(value).expanduser()
        if not path.exists():
            raise ConfigError(f"{where}: {field}: local path {value!r} does not exist (relative paths are "
                              f"relative to the current directory {os.getcwd()})")
        container[key] = str(path.resolve())

    fix(trial, "teacher", "trial.teacher", keep=("demo",))
    if isinstance(trial.get("data"), dict):
        fix(trial["data"], "source", "trial.data.source", keep=("teacher-samples",))
    if isinstance(trial.get("glue"), dict):
        fix(trial["glue"], "source", "trial.glue.source", keep=("glue",))
    if isinstance(trial.get("lm_eval"), dict):
        fix(trial["lm_eval"], "include_path", "trial.lm_eval.include_path")
    _check_local_inputs(trial, where)
    return trial


def _check_local_inputs(trial: dict, where: str) -> None:
    """What would otherwise fail in every trial, checked once before Ray starts: a local teacher directory must hold
    safetensors weights (never a pickle), a local corpus directory its train and valid splits."""
    from kron.errors import UserError

    teacher = trial.get("teacher")
    if isinstance(teacher, str) and not teacher.startswith("config:") and Path(teacher).is_dir():
        from kron.models import check_weights

        try:
            check_weights(Path(teacher))
        except UserError as exc:
            raise ConfigError(f"{where}: trial.teacher: {exc}") from None
    data = trial.get("data")
    source = data.get("source") if isinstance(data, dict) else None
    if isinstance(source, str) and Path(source).is_dir() and trial.get("stage1", {}) is not None:  # stage 1 reads it
        from trials.data import local_source_file

        for split in ("train", "valid"):
            try:
                local_source_file(source, split)
            except UserError as exc:
                raise ConfigError(f"{where}: trial.data.source: {exc}") from None


def _absolute_storage(storage: str) -> str:
    if "://" in storage:
        return storage
    return str(Path(storage).expanduser().resolve())


def is_remote_storage(storage: str) -> bool:
    return "://" in storage and not storage.startswith("file://")


# ----------------------------------------------------------------------------------------------- smoke test


def smoke_config(data: dict) -> dict:
    """A copy of a raw config shrunk for a quick end-to-end check: 2 trials of 4 steps (evaluated every 2) on
    16 short blocks, ASHA grace 2, at most 8 examples per lm_eval task, and "-smoke" appended to the name."""
    data = copy.deepcopy(data)
    data["name"] = f"{data.get('name', 'search')}-smoke"
    trial = data.setdefault("trial", {})
    d = trial.setdefault("data", {})
    d["seq_len"] = min(int(d.get("seq_len", 32)), 32)
    d["num_samples"] = min(int(d.get("num_samples", 16)), 16)
    d["val_blocks"] = min(int(d.get("val_blocks", 4)), 4)
    if d.get("max_train_tokens") is None or int(d["max_train_tokens"]) > 20_000:
        d["max_train_tokens"] = 20_000
    for stage in ("stage1", "stage2"):
        s = trial.get(stage)
        if s is None:
            continue
        s["max_steps"], s["eval_every"], s["batch_size"] = 4, 2, min(int(s.get("batch_size", 2)), 2)
        s["eval_batches"] = 2
        s["max_minutes"] = None
        s.pop("warmup_steps", None)
    if isinstance(trial.get("glue"), dict):
        trial["glue"]["max_train_examples"] = 32
        trial["glue"]["max_eval_examples"] = 32
        trial["glue"]["max_len"] = min(int(trial["glue"].get("max_len", 32)), 32)
    if isinstance(trial.get("lm_eval"), dict):
        trial["lm_eval"]["limit"] = min(int(trial["lm_eval"].get("limit") or 8), 8)
    s = data.setdefault("search", {})
    s["num_samples"] = min(int(s.get("num_samples", 2)), 2)
    s["max_concurrent"] = min(int(s.get("max_concurrent", 2)), 2)
    if s.get("asha", {}) is not None:
        s["asha"] = {"grace_period": 2, "reduction_factor": 2}
    s["time_budget_minutes"] = None
    return data


def config_fingerprint(cfg: SearchConfig) -> dict:
    """The parts of a config that must not change when a search is resumed (the trial and the space)."""
    fp = {"trial": cfg.trial_section, "space": cfg.space.model_dump(mode="json"),
          "init": cfg.trial.init_config.method}  # the init trials get, set or by default (search_defaults)
    if cfg.trial.teacher == DEMO and DEMO_TEACHER_RELEASE > 1:  # release 1 was never recorded: its searches lack it
        fp["demo_teacher_release"] = DEMO_TEACHER_RELEASE
    if cfg.search.seed_plans:  # they add options to the space
        fp["seed_plans"] = list(cfg.search.seed_plans)
        if has_auto_seeds(cfg.search.seed_plans):  # what the automatic seeds minimise decides which they are
            fp["seed_damage"] = cfg.search.seed_damage
            if cfg.search.seed_damage == "kl":
                fp["seed_embedding"] = cfg.search.seed_embedding
            if cfg.search.seed_evolve is not None:  # absent otherwise: searches from before it resume unchanged
                fp["seed_evolve"] = cfg.search.seed_evolve.model_dump(mode="json")
    a = cfg.search.asha
    if a is not None and a.rungs is not None:  # an explicit schedule (absent otherwise, as before it existed)
        fp["asha_rungs"] = {"rungs": list(a.rungs), "reduction_factor": a.reduction_factor}
    return fp


AUTO_SEED = re.compile(r"auto(?::(\d+))?")  # a seed plan name asking for automatic plans: "auto", "auto:N"
AUTO_AT = re.compile(r"auto@(.*)")  # one automatic plan at a size: "auto@3.5M", or at a preset's / plan's: "auto@lowrank:2"


def has_auto_seeds(names) -> bool:
    """Whether seed plan names ask for automatic plans ("auto", "auto:N", "auto@TARGET")."""
    return any(isinstance(n, str) and (AUTO_SEED.fullmatch(n) or AUTO_AT.fullmatch(n)) for n in names or ())
