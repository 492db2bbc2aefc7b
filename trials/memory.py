"""What a trial needs in memory, checked before anything is loaded, and the precision settings of its training step.

A distillation trial holds the frozen teacher (its parameters in `teacher_dtype`), the student in `dtype` with a
gradient and AdamW's two moment estimates per parameter, and the activations of one batch. `check_trial_memory`
counts the first parts from the teacher's config (built on the meta device: no weights read) and the trial's plan
(`_sizes`), and leaves the activations out: a trial it passes may still run out (then the trial's status says
"out of memory").

`autocast` and `grad_scaler` are the student's mixed precision (`trial.amp`); `enable_checkpointing` turns on
transformers' gradient checkpointing (`trial.gradient_checkpointing`).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from kron.errors import ConfigError, DataError

__all__ = ["autocast", "check_trial_memory", "enable_checkpointing", "free_bytes", "grad_scaler", "trial_memory"]

GIB = 2**30


def _width(name: str) -> int:
    return torch.empty((), dtype=getattr(torch, name)).element_size()


def trial_memory(cfg, teacher_params: int, student_params: int | None = None) -> dict:
    """Bytes of the teacher, the student's weights, gradients and AdamW states (student_params: default the
    teacher's, the most a compressed student holds), and their total."""
    student_params = teacher_params if student_params is None else student_params
    tw, sw = _width(cfg.teacher_dtype_name), _width(cfg.dtype)
    out = {"teacher": teacher_params * tw, "student": student_params * sw, "gradients": student_params * sw,
           "optimizer": 2 * student_params * sw}
    out["total"] = sum(out.values())
    return out


def free_bytes(device: torch.device) -> int | None:
    """Free memory of the device: CUDA's free bytes, or the host's available memory (Linux MemAvailable; None when
    unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _sizes(cfg) -> tuple[int, int] | None:
    """(teacher parameters, student parameters) from the teacher's config on the meta device and the trial's plan;
    None for a source whose config cannot be read that way (a compressed model folder). The student's count is
    exact for linear matrices (a pruned bias counted whole) and generous for a factored embedding (its factors
    added, the table kept, as a tied LM head keeps it); layer dropping keeps its share of the layers."""
    from kron.models import build_from_config, load_config, resolve_source
    from kron.plan import KEEP
    from kron.profile import compressible_matrices
    from kron.surgery import count_params

    from .inputs import build_plan

    src = resolve_source(cfg.teacher)
    if not src.startswith("config:") and (Path(src).expanduser() / "kronsearch.json").is_file():
        return None
    config = load_config(src, trust_remote_code=cfg.trust_remote_code)
    task = "sequence-classification" if cfg.glue is not None else "auto"
    model = build_from_config(config, task=task, device="meta", trust_remote_code=cfg.trust_remote_code)
    teacher = count_params(model)
    if cfg.method == "layerdrop":
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 1
        kept = len(cfg.keep_layers) if isinstance(cfg.keep_layers, list) else (layers + 1) // 2
        return teacher, int(teacher * min(1.0, kept / layers)) + 1
    if not cfg.builds_by_plan:
        return teacher, teacher
    mats = {m.name: m for m in compressible_matrices(model)}
    modules = dict(model.named_modules())
    student = teacher
    for name, spec in build_plan(cfg, config).resolve(model).items():
        if spec == KEEP:
            continue
        if name in mats:
            student += spec.params(mats[name].m, mats[name].n) - mats[name].m * mats[name].n
        elif hasattr(modules.get(name), "weight"):
            v, d = modules[name].weight.shape
            student += spec.params(v, d)
    return teacher, student


def check_trial_memory(cfg, device: torch.device, free: int | None = None) -> dict | None:
    """DataError naming the sizes when the trial's teacher, student, gradients and optimiser states (`trial_memory`)
    exceed the device's free memory; the estimate otherwise (None when the teacher's size or the free memory is
    unknown). `KRONSEARCH_FREE_MEMORY_GB` overrides the free memory (to test, or to leave room for others)."""
    override = os.environ.get("KRONSEARCH_FREE_MEMORY_GB")
    if override:
        try:
            free = int(float(override) * GIB)
        except ValueError:
            raise ConfigError(f"KRONSEARCH_FREE_MEMORY_GB must be a number of GiB, got {override!r}") from None
    free = free_bytes(device) if free is None else free
    sizes = _sizes(cfg)
    if sizes is None or free is None:
        return None
    n, n_student = sizes
    need = trial_memory(cfg, n, n_student)
    if need["total"] > free:
        hint = []
        if cfg.teacher_dtype_name == "float32":
            hint.append("teacher_dtype: bfloat16")
        if not cfg.gradient_checkpointing:
            hint.append("gradient_checkpointing: true (activations)")
        raise DataError(
            f"the trial needs at least {need['total'] / GIB:.1f} GiB on {device} and it has {free / GIB:.1f} GiB free: "
            f"teacher {n / 1e6:,.1f}M parameters in {cfg.teacher_dtype_name} ({need['teacher'] / GIB:.1f} GiB), student "
            f"{n_student / 1e6:,.1f}M in {cfg.dtype} with gradients and AdamW states "
            f"({(need['total'] - need['teacher']) / GIB:.1f} GiB), "
            f"activations not counted; {'try ' + ', '.join(hint) + ', ' if hint else ''}a device with more memory, or "
            "memory_check: false to try anyway")
    return need


def autocast(cfg, device: torch.device):
    """The student's mixed-precision context (`trial.amp`), a no-op for "none"."""
    if cfg.amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, cfg.amp))


def grad_scaler(cfg, device: torch.device):
    """A gradient scaler for amp float16 (underflowing half-precision gradients), else None."""
    if cfg.amp != "float16":
        return None
    return torch.amp.GradScaler(device.type)


def enable_checkpointing(student) -> None:
    """transformers' gradient checkpointing on `student` (non-reentrant, so frozen inputs and ILKD's outputs work);
    ConfigError for a model that does not support it."""
    if not getattr(student, "supports_gradient_checkpointing", False):
        raise ConfigError(f"gradient_checkpointing: {type(student).__name__} does not support gradient "
                          "checkpointing in transformers; set it to false")
    if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.x's name for it
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(student.config, "use_cache", None):
        student.config.use_cache = False
