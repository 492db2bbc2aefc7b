"""Typed, validated trial configuration (YAML/JSON/dict).

Unknown keys are errors; every error names the field, the value and what would be valid. The same model is
embedded in search configs, so a trial config is also what one search sample becomes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kron.errors import ConfigError, one_line, shown_value  # shown_value: also imported from here
from kron.yamlio import YamlTooLarge, load_yaml

__all__ = [
    "DataConfig",
    "DistillConfig",
    "EarlyStopConfig",
    "GlueConfig",
    "InitConfig",
    "LmEvalConfig",
    "PlanSource",
    "StageConfig",
    "TeacherCacheConfig",
    "TrialConfig",
    "MAX_ERROR_LINES",
    "format_validation_error",
    "join_problems",
    "load_trial_config",
    "read_yaml_mapping",
    "shown_value",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True,
                              allow_inf_nan=False)  # lr: .inf passed every check, then every trial diverged


class DataConfig(_Strict):
    """Text for LM distillation (stage 1)."""

    source: str = Field("teacher-samples", description="a local file/dir, a datasets-hub name, or 'teacher-samples'")
    config_name: str | None = None
    seq_len: int = Field(128, ge=8, le=8192)
    max_train_tokens: int | None = Field(None, ge=1)
    val_blocks: int = Field(32, ge=1)
    # data-free text sampled from the teacher
    num_samples: int = Field(256, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(50, ge=0)


class GlueConfig(_Strict):
    """A GLUE task for stage-2 task distillation."""

    task: str
    source: str = Field("glue", description="a local directory in the GLUE TSV layout, or 'glue' (the hub)")
    max_len: int = Field(128, ge=8, le=4096)
    max_train_examples: int | None = Field(None, ge=1)
    max_eval_examples: int | None = Field(None, ge=1)

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        from .glue import get_task

        get_task(v)  # unknown task: "unknown GLUE task ...; valid: ..."
        return v


class LmEvalConfig(_Strict):
    """lm-evaluation-harness tasks whose score is the trial's final quality: the mean over `tasks` of each task's
    main metric (`metric`, default acc_norm where the task reports it, else acc), higher is better, measured once on
    the best checkpoint at the end (stage 1 still selects that checkpoint and stops early on val perplexity)."""

    tasks: list[str] = Field(min_length=1, description="lm-eval task names, e.g. [arc_easy, hellaswag, piqa, "
                                                       "winogrande], or tasks defined in include_path")
    limit: int | None = Field(None, ge=1, description="the first N examples of each task (default: all)")
    include_path: str | None = Field(None, description="folder of extra task YAMLs (local, offline tasks)")
    metric: str | None = Field(None, description="the metric of every task that counts (default: acc_norm where a "
                                                 "task reports it, else acc, else its first)")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples (default: each task's own, 0 for "
                                                            "the tasks above)")
    batch_size: int = Field(8, ge=1)

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, v: list[str]) -> list[str]:
        from .harness import split_tasks

        return split_tasks(v)  # stripped, no repeats; none at all: "no task names"


class DistillConfig(_Strict):
    """α weights of the ILKD loss (method.md) and the logits-KD temperature."""

    emb: float = Field(0.5, ge=0)
    att: float = Field(0.5, ge=0)
    hid: float = Field(0.5, ge=0)
    ce: float = Field(0.1, ge=0)
    logits: float = Field(0.0, ge=0)
    temperature: float = Field(2.0, gt=0)
    layer_map: list[int] | None = None


class EarlyStopConfig(_Strict):
    patience: int = Field(3, ge=1, description="evaluations without improvement before stopping")
    min_delta: float = Field(0.0, ge=0, description="relative improvement that counts (0.01 = 1%)")


class StageConfig(_Strict):
    """One distillation stage: optimiser, budget, evaluation cadence, early stopping."""

    lr: float = Field(2.5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1)
    max_steps: int = Field(200, ge=0)
    max_minutes: float | None = Field(None, gt=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    eval_every: int = Field(50, ge=1)
    eval_batches: int | None = Field(None, ge=1, description="cap on validation batches per evaluation")
    early_stopping: EarlyStopConfig | None = Field(default_factory=EarlyStopConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)


class InitConfig(_Strict):
    """How the student's factors are initialised: `svd` (data-free) or `data` (activation-aware, from calibration
    statistics of the teacher on `calib`: a text file/folder, a hub dataset, glue:<task>[:dir] or
    teacher-samples; default: the trial's own stage-1 data source)."""

    method: Literal["svd", "data"] = "svd"
    calib: str | None = Field(None, description="calibration data source (default: data.source)")
    calib_config_name: str | None = Field(None, description="hub config of `calib` (default: data.config_name when "
                                                             "calib is the stage-1 source)")
    calib_tokens: int = Field(8192, ge=2, description="calibration token budget (1/8 held out for the report)")
    ridge: float | None = Field(None, ge=0, allow_inf_nan=False,
                                description="λ = ridge · mean(diag S) added to S (default 1e-2, kron.datainit)")
    split: Literal["output", "input"] | None = Field(
        None, description="side that factor rules split among equally compressing shapes (default: input for data, "
                          "output for svd)")

    @model_validator(mode="after")
    def _data_only(self):
        if self.method == "svd" and self.calib is not None:
            raise ValueError("calib is for init method 'data' (give method: data, or remove calib)")
        if self.method == "svd" and self.ridge is not None:
            raise ValueError("ridge is for init method 'data' (give method: data, or remove ridge)")
        return self


class TeacherCacheConfig(_Strict):
    """Reuse of the teacher's outputs (hidden states, attention maps, logits) for a batch by later trials of the same
    process (a reused search worker): see trials.teacher_cache. In memory the outputs are kept exactly as computed
    (identical losses); on disk in float16 (losses then differ slightly), off by default."""

    enabled: bool = True
    memory_mb: float = Field(1024, ge=0, description="bound on the outputs kept in memory (MB; CPU RAM)")
    disk_mb: float = Field(0, ge=0, description="bound on the outputs spilled to disk in float16 (MB; 0: none, "
                                                 "batches beyond the memory bound are recomputed)")
    disk_dir: str | None = Field(None, description="folder for the spilled outputs (default: the system's temporary "
                                                   "folder; removed when the process exits)")


class PlanSource(_Strict):
    """Where the compression plan comes from: exactly one of preset, file, or inline rules."""

    preset: str | None = None
    file: str | None = None
    rules: list[dict[str, Any]] | None = None
    default: str = "keep"

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("preset", "file", "rules") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of preset, file or rules (got {given or 'none'})")
        return self


class TrialConfig(_Strict):
    """One trial: teacher → compressed student → distillation stage(s) → evaluation."""

    name: str | None = None
    teacher: str = Field("demo", description="'demo', a local model directory, a hub name, or config:...")
    method: Literal["kronecker", "lowrank", "mixed", "layerdrop", "prune", "teacher"] | None = Field(
        None, description="what the trial is, for results tables: by default what its plan is (all Kronecker: "
                          "kronecker, all low-rank: lowrank — the baseline —, all pruning: prune, several: mixed), "
                          "layerdrop with keep_layers, lowrank with lowrank_ratio; teacher: the uncompressed "
                          "reference. Given with a plan it names the trial as that (a search's trials are 'mixed' "
                          "when its space mixes methods); the plan decides the structure either way")
    plan: PlanSource | None = None
    lowrank_ratio: float | None = Field(None, gt=1, description="lowrank: parameter reduction of each attention/FFN "
                                                                  "matrix (the preset lowrank:<ratio>)")
    keep_layers: list[int] | Literal["odd", "even"] | None = Field(
        None, description="layerdrop: teacher layers kept (zero-based; 'odd' = 1, 3, ...)")
    init: Literal["svd", "data"] | InitConfig = Field(
        "svd", description="'svd', 'data' (calibrated on the stage-1 data) or {method: data, calib: SRC, calib_tokens: "
                           "N}")
    data: DataConfig = Field(default_factory=DataConfig)
    stage1: StageConfig | None = Field(default_factory=StageConfig)
    glue: GlueConfig | None = None
    stage2: StageConfig | None = None
    lm_eval: LmEvalConfig | None = Field(None, description="make the final quality an lm-evaluation-harness score "
                                                           "of the best checkpoint (stage 1 only)")
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="the student's weights (and the teacher's "
                                                                        "unless teacher_dtype says otherwise)")
    teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="the frozen teacher's weights: bfloat16 / float16 halve its memory (its outputs are "
                          "compared in float32); null: as dtype")
    amp: Literal["none", "bfloat16", "float16"] = Field(
        "none", description="mixed precision for the student's forward pass and losses (torch.autocast; float16 "
                            "with a gradient scaler, CUDA only); the weights and optimiser stay in dtype")
    gradient_checkpointing: bool = Field(
        False, description="recompute each transformer layer's activations in the backward pass instead of keeping "
                           "them (transformers' gradient checkpointing): less memory, ~30% more time")
    memory_check: bool = Field(True, description="refuse, before loading, a trial whose teacher, student, gradients "
                                                 "and optimiser states cannot fit the device's free memory")
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch threads (default: leave torch's choice)")
    save_checkpoint: bool = True
    qat: bool = Field(True, description="quantised matrices (quantize: int8 or int4) train through fake quantisation: "
                      "float master weights, a straight-through estimator, the 8- or 4-bit weights recomputed from "
                      "them; false keeps their quantised weights fixed during distillation and trains the rest")
    teacher_cache: bool | TeacherCacheConfig = Field(
        True, description="reuse the teacher's outputs across trials of one process: true (1 GiB in memory), false, "
                          "or {memory_mb, disk_mb, disk_dir}")
    trust_remote_code: bool = False
    label: str | None = Field(None, description="how results tables and plots name this trial (default: the preset "
                                                "or baseline it runs, else its trial id)")
    reference: bool = Field(False, description="a hand-made plan run as a reference point: analysis lists it with "
                                               "the baselines (as it does presets, low-rank and layer-drop trials) "
                                               "instead of as a member of a search's front; not for searches")

    @field_validator("teacher")
    @classmethod
    def _teacher_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("teacher must name a model ('demo', a directory, a hub name or config:...)")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.method is None and self.plan is None and self.lowrank_ratio is None and self.keep_layers is None:
            raise ValueError("a trial needs a plan (preset, file or rules), lowrank_ratio (the low-rank baseline), "
                             "keep_layers (layer dropping) or method: teacher")
        if self.method is None and self.keep_layers is not None:
            self.method = "layerdrop"
        if self.method is None and self.lowrank_ratio is not None:
            self.method = "lowrank"
        if self.method in ("kronecker", "mixed", "prune") and self.plan is None:
            raise ValueError(f"method {self.method!r} needs a plan (preset, file or rules)")
        if self.method == "lowrank" and (self.lowrank_ratio is None) == (self.plan is None):
            raise ValueError("method 'lowrank' needs exactly one of lowrank_ratio (e.g. 2.0: the preset lowrank:2) "
                             "or a plan whose rules use lowrank_rank / lowrank_ratio (got "
                             f"{'both' if self.plan is not None else 'neither'})")
        if self.method == "layerdrop" and self.keep_layers is None:
            raise ValueError("method 'layerdrop' needs keep_layers ('odd', 'even' or a list)")
        if self.method == "layerdrop" and self.plan is not None:
            raise ValueError("method 'layerdrop' keeps whole teacher layers and takes no plan; remove `plan` (or use "
                             "method 'kronecker' / 'lowrank')")
        if self.lowrank_ratio is not None and self.method != "lowrank":
            raise ValueError(f"lowrank_ratio applies to method 'lowrank' only (method is {self.method!r})")
        if self.keep_layers is not None and self.method != "layerdrop":
            raise ValueError(f"keep_layers applies to method 'layerdrop' only (method is {self.method!r})")
        if isinstance(self.keep_layers, list) and not self.keep_layers:
            raise ValueError("keep_layers is empty: keep at least one layer ('odd', 'even' or a list of indices)")
        if self.stage2 is not None and self.glue is None:
            raise ValueError("stage2 (task distillation) needs a glue task")
        if self.glue is not None and self.stage2 is None:
            self.stage2 = StageConfig(lr=2e-5, batch_size=16, distill=DistillConfig(ce=0.02, logits=1.0))
        if self.stage1 is None and self.stage2 is None:
            raise ValueError("a trial needs stage1 (LM distillation) and/or stage2 (GLUE task distillation)")
        if self.lm_eval is not None and self.glue is not None:
            raise ValueError("lm_eval scores the stage-1 language model, but this trial ends with GLUE task "
                             f"distillation ({self.glue.task}) and ranks by its GLUE metric: remove lm_eval or glue")
        if self.amp == "float16" and self.device == "cpu":
            raise ValueError("amp float16 needs a CUDA device (its gradient scaler); on a CPU use amp: bfloat16")
        if self.amp != "none" and self.dtype != "float32":
            raise ValueError(f"amp {self.amp} keeps float32 weights and runs the forward pass in {self.amp}: with "
                             f"dtype {self.dtype} the weights are already in it; give one of the two")
        return self

    @property
    def teacher_dtype_name(self) -> str:
        """The dtype the teacher is loaded in: `teacher_dtype`, else `dtype`."""
        return self.teacher_dtype or self.dtype

    @property
    def builds_by_plan(self) -> bool:
        """Whether the student is the teacher compressed by a plan (its `plan`, or the preset lowrank:<ratio>), as
        opposed to dropped layers or the teacher itself."""
        return self.plan is not None or self.lowrank_ratio is not None

    @property
    def init_config(self) -> InitConfig:
        """`init` as an InitConfig (a plain 'svd' / 'data' gives the defaults)."""
        return self.init if isinstance(self.init, InitConfig) else InitConfig(method=self.init)

    @property
    def teacher_cache_config(self) -> TeacherCacheConfig:
        """`teacher_cache` as a TeacherCacheConfig (true / false give the defaults, on / off)."""
        tc = self.teacher_cache
        return tc if isinstance(tc, TeacherCacheConfig) else TeacherCacheConfig(enabled=tc)

    @property
    def quality_name(self) -> str:
        if self.lm_eval is not None:
            return f"lm_eval_{self.lm_eval.metric or 'acc'}"
        if self.glue is not None:
            from .glue import main_metric

            return main_metric(self.glue.task)[0]
        return "val_ppl"

    @property
    def quality_mode(self) -> str:
        return "max" if self.glue is not None or self.lm_eval is not None else "min"


MAX_ERROR_LINES = 10  # problems listed in one message; the rest are counted


def join_problems(lines: list[str]) -> str:
    """Validation problems on one line: the first `MAX_ERROR_LINES`, then how many more."""
    if len(lines) > MAX_ERROR_LINES:
        lines = lines[:MAX_ERROR_LINES] + [f"and {len(lines) - MAX_ERROR_LINES} more problems"]
    return "; ".join(lines)


def _model_at(model: type[BaseModel], loc) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (a location without its last key), or None."""
    import typing

    for key in loc:
        if not isinstance(key, str) or key not in model.model_fields:
            return None
        ann = model.model_fields[key].annotation
        model = next((c for c in (ann, *typing.get_args(ann)) if isinstance(c, type) and issubclass(c, BaseModel)),
                     None)
        if model is None:
            return None
    return model


def format_validation_error(exc: ValidationError, where: str = "config", root: type[BaseModel] | None = None) -> str:
    """One line per problem: `field.path: message (got value)`; an unknown key lists the valid keys of its section
    when `root` (the validated model) is given."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            owner = _model_at(root, err["loc"][:-1]) if root is not None else None
            if owner is not None:
                lines.append(f"{where}: {loc}: unknown key (got {shown_value(err.get('input'))}); valid keys"
                             f"{' here' if len(err['loc']) > 1 else ''}: {_known_fields(owner)}")
                continue
        lines.append(f"{where}: {loc}: {one_line(msg)} (got {shown_value(err.get('input'))})")
    return join_problems(lines)


def _known_fields(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


def read_yaml_mapping(path: str | Path, what: str, *, empty_ok: bool = False) -> dict:
    """Parse a YAML (or JSON) file that must hold a mapping; ConfigError naming the file on any problem.

    `what` completes "expected a mapping of ..." in the error (e.g. "trial settings").
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what.split(' ')[0]} config file not found: {path}")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except YamlTooLarge as exc:
        raise ConfigError(f"{path}: too large to read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file (YAML expected; {exc.reason} at byte {exc.start})") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of {what}, got {type(data).__name__}")
    return data


def load_trial_config(src: str | Path | dict | TrialConfig) -> TrialConfig:
    """Build a TrialConfig from a YAML/JSON path, a dict or an existing config; ConfigError on any problem."""
    if isinstance(src, TrialConfig):
        return src
    where = "trial config"
    if isinstance(src, (str, Path)):
        where = str(src)
        data = read_yaml_mapping(src, "trial settings")
        data = data.get("trial", data) if set(data) == {"trial"} else data
    else:
        data = dict(src)
    try:
        return TrialConfig.model_validate(data)
    except ValidationError as exc:
        msg = format_validation_error(exc, where, root=TrialConfig)
        raise ConfigError(msg) from None
