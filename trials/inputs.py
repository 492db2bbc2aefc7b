"""What a trial starts from — the teacher, its data and the compressed student — each cached per process: a reused
Ray worker loads each teacher and data set once (`clear_caches` frees them), and `prepare_data` fills them (and the
on-disk caches every worker reads) before any trial runs."""
from __future__ import annotations

import copy
import json
import time
from typing import Any

import torch

from kron.errors import UserError
from kron.initcache import process_init_cache
from kron.models import is_causal_lm  # re-exported: trials.trial and older callers import it from here

from .config import TrialConfig, load_trial_config
from .teacher_cache import teacher_cache, teacher_identity

__all__ = ["TEACHER_QUALITY", "build_plan", "build_student", "check_named_method", "clear_caches", "is_causal_lm", "load_glue_data",
           "load_lm_data", "load_teacher", "prepare_data", "report_counts", "teacher_key"]

# Per-process caches: a reused worker loads each teacher and data set once.
_TEACHERS: dict[tuple, Any] = {}
_DATA: dict[tuple, Any] = {}
# the teacher's own quality on a stage's evaluation data (trials.trial), so a reused worker evaluates it once
TEACHER_QUALITY: dict[tuple, float] = {}


def clear_caches() -> None:
    _TEACHERS.clear()
    _DATA.clear()
    TEACHER_QUALITY.clear()
    teacher_cache().clear()
    process_init_cache().clear()


# ----------------------------------------------------------------------------------------------- loading


def load_teacher(cfg: TrialConfig, device: torch.device):
    """The teacher (eval mode, frozen, eager attention) and its tokenizer, cached per process."""
    task = "sequence-classification" if cfg.glue is not None else "auto"
    key = teacher_key(cfg, device)
    if key not in _TEACHERS:
        from kron.models import load_model, load_tokenizer, resolve_source

        src = resolve_source(cfg.teacher)
        model = load_model(src, task=task, device=device, dtype=getattr(torch, cfg.teacher_dtype_name),
                           trust_remote_code=cfg.trust_remote_code)
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")  # ILKD needs the attention probabilities
        model.eval().requires_grad_(False)
        tokenizer = load_tokenizer(src, trust_remote_code=cfg.trust_remote_code)
        _TEACHERS[key] = (model, tokenizer)
    return _TEACHERS[key]


def teacher_key(cfg: TrialConfig, device) -> tuple:
    task = "sequence-classification" if cfg.glue is not None else "auto"
    return (cfg.teacher, task, str(device), cfg.teacher_dtype_name, cfg.trust_remote_code)


def prepare_data(config, device: str | torch.device | None = None) -> dict[str, float]:
    """Load the teacher and build every stage's data once in this process, before any trial runs.

    The on-disk caches (token blocks of a corpus, data-free teacher samples) then exist before several workers would
    each build the same data at the same time, and a data problem surfaces here rather than in every trial. The
    process caches stay filled (a following `run_trial` here reuses them); `clear_caches()` frees them.
    Returns the seconds spent loading the teacher and building the data.
    """
    from kron.models import pick_device

    cfg = load_trial_config(config)
    device = pick_device(cfg.device if device is None else device)
    t0 = time.time()
    teacher, tokenizer = load_teacher(cfg, device)
    t1 = time.time()
    if cfg.stage1 is not None:
        load_lm_data(cfg, teacher, tokenizer, device)
    if cfg.stage2 is not None:
        load_glue_data(cfg, tokenizer)
    out = {"teacher_s": t1 - t0, "data_s": time.time() - t1}
    if cfg.init_config.method == "data" and cfg.builds_by_plan:
        from .calibration import trial_calibration

        t2 = time.time()
        trial_calibration(cfg, teacher, tokenizer)  # fills the disk cache every trial's init reads
        out["calibration_s"] = time.time() - t2
    return out


def load_lm_data(cfg: TrialConfig, teacher, tokenizer, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_blocks, val_blocks) of token ids for stage 1, cached per process."""
    d = cfg.data
    key = ("lm", cfg.teacher, d.model_dump_json())
    if key not in _DATA:
        from . import data as data_mod

        if d.source == "teacher-samples":
            if not is_causal_lm(teacher):
                raise UserError("data.source 'teacher-samples' needs a causal-LM teacher; give a text corpus instead")
            # the cache key of sample_teacher_text covers the teacher's weights and the sampling settings
            sample = dict(temperature=d.temperature, top_k=d.top_k, device=device)
            train = data_mod.sample_teacher_text(teacher, tokenizer, d.num_samples, d.seq_len, seed=0, **sample)
            val = data_mod.sample_teacher_text(teacher, tokenizer, d.val_blocks, d.seq_len, seed=1, **sample)
        else:
            train = data_mod.load_text_blocks(d.source, tokenizer, d.seq_len, "train", config_name=d.config_name,
                                              max_tokens=d.max_train_tokens)
            val = data_mod.load_text_blocks(d.source, tokenizer, d.seq_len, "valid", config_name=d.config_name)
            val = val[: d.val_blocks]
        _DATA[key] = (train, val)
    return _DATA[key]


def load_glue_data(cfg: TrialConfig, tokenizer):
    """Encoded (train, dev) tensors dicts for stage 2, cached per process."""
    g = cfg.glue
    key = ("glue", cfg.teacher, g.model_dump_json())
    if key not in _DATA:
        from . import glue as glue_mod

        out = []
        for split, cap in (("train", g.max_train_examples), ("dev", g.max_eval_examples)):
            examples = glue_mod.load_glue(g.task, g.source, split)
            if cap is not None:
                examples = examples[:cap] if isinstance(examples, list) else examples.select(range(min(cap, len(examples))))
            out.append(glue_mod.encode_glue(examples, tokenizer, g.max_len))
        _DATA[key] = tuple(out)
    return _DATA[key]


# ----------------------------------------------------------------------------------------------- student


def build_plan(cfg: TrialConfig, model_config):
    from kron.plan import CompressionPlan
    from kron.presets import preset_plan

    if cfg.lowrank_ratio is not None:
        return preset_plan(f"lowrank:{cfg.lowrank_ratio:g}", model_config)
    p = cfg.plan
    if p.preset is not None:
        return preset_plan(p.preset, model_config)
    if p.file is not None:
        return CompressionPlan.load(p.file)
    return CompressionPlan.from_dict({"default": p.default, "rules": p.rules})


def build_student(cfg: TrialConfig, teacher) -> tuple[torch.nn.Module, dict, Any]:
    """A trainable copy of the teacher compressed as the trial says; returns (student, report dict, plan).

    A plan (or lowrank_ratio): the plan's modules replaced by its methods' layers, initialised by SVD or, with
    `init: data`, from the teacher's calibration statistics (each method's data-aware init); the report is
    CompressionReport.to_dict() plus `plan_method`, what the plan is (`kron.methods.base.family_of`: kronecker,
    lowrank, prune, mixed, ...). layerdrop: the teacher's kept layers (plan None); the report has the same keys plus
    plan, plan_summary and layer_map (student layer i -> teacher layer), which the ILKD stages use unless a stage
    gives its own.
    """
    if cfg.method == "layerdrop":
        from kron.baselines import drop_layers, size_report

        student, layer_map = drop_layers(teacher, cfg.keep_layers, inplace=False)
        student.requires_grad_(True).to(getattr(torch, cfg.dtype))
        n_teacher = teacher.config.num_hidden_layers
        comp = size_report(teacher, student)
        comp.update(plan={"method": "layerdrop", "keep_layers": layer_map, "teacher_layers": n_teacher},
                    plan_summary=f"layerdrop keep {layer_map} of {n_teacher} layers", layer_map=layer_map)
        return student, comp, None
    student = copy.deepcopy(teacher).requires_grad_(True)
    if cfg.teacher_dtype_name != cfg.dtype:  # a half-precision teacher: the student trains in its own dtype
        student.to(getattr(torch, cfg.dtype))
    if cfg.builds_by_plan:
        from kron.baselines import describe_lowrank
        from kron.methods.base import family_of, structure_of
        from kron.plan import KEEP
        from kron.surgery import apply_specs, default_split

        from .calibration import trial_calibration

        init = cfg.init_config  # svd, or data-aware from calibration statistics of the teacher (trials.calibration)
        plan = build_plan(cfg, teacher.config)
        specs = plan.resolve(student, split=init.split or default_split(init.method))
        used = [s.method for s in specs.values() if s != KEEP] + [structure_of(s).method for s in specs.values()
                                                                   if s != KEEP]
        check_named_method(cfg.method, specs)
        calib = trial_calibration(cfg, teacher)
        # a reused worker restores layers it already initialised for this teacher and these statistics
        # (kron.initcache: the same values; the data-aware init is most of a trial's set-up)
        device = next(teacher.parameters()).device
        scope = None if calib is not None and not calib.key else repr((  # statistics without a key: no reuse
            teacher_identity(teacher_key(cfg, device), teacher),
            None if calib is None else json.dumps(calib.key, sort_keys=True, default=str)))
        comp = apply_specs(student, specs, inplace=True, init=init.method, calib=calib, ridge=init.ridge,
                           init_cache=process_init_cache(), cache_scope=scope).to_dict()
        comp["plan_method"] = family_of(used) if used else None
        if (cfg.method or comp["plan_method"]) == "lowrank":
            comp["plan_summary"] = describe_lowrank(plan, comp)
        return student, comp, plan
    if cfg.method == "teacher":  # the uncompressed reference point, distilled from itself (no-op) and evaluated
        return student, report_counts(student), None
    raise UserError(f"unknown method {cfg.method!r}")


def check_named_method(method: str | None, specs: dict) -> None:
    """A config that names its trial's method ("lowrank", "kronecker", "prune") must have a plan that is that
    (`family_of` its matrices' structures; a matrix only modified — the dense matrix in int8 — counts only in a plan
    without any structure): the plan says what the trial is, so leaving `method` out is always right, and "mixed"
    takes any plan."""
    from kron.methods.base import family_of, structure_of
    from kron.plan import KEEP

    if method in (None, "mixed"):
        return
    used = {name: structure_of(spec).method for name, spec in specs.items() if spec != KEEP}
    if not used or family_of(used.values()) == method:
        return
    name = next(n for n, m in used.items() if family_of([m]) != method)
    raise UserError(f"method {method!r}: the plan makes module {name} {specs[name].describe()} "
                    f"({family_of(used.values())}); leave `method` out (the plan says what the trial is) or give "
                    "method: mixed")


def report_counts(model) -> dict:
    from kron.surgery import count_bytes, count_params, macs_per_token

    n_all, n_excl = count_params(model), count_params(model, exclude_output_embedding=True)
    macs = macs_per_token(model)
    n_bytes = count_bytes(model)
    return {"params_before": n_all, "params_after": n_all, "bytes_before": n_bytes, "bytes_after": n_bytes,
            "params_before_excluding_output_embedding": n_excl, "params_after_excluding_output_embedding": n_excl,
            "macs_per_token_before": macs, "macs_per_token_after": macs, "compression_ratio": 1.0}
