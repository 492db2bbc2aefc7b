"""Devices and dtypes from config values: "auto" picks CUDA when it is there and the CPU otherwise, never
requiring a GPU. Used by model loading (kron.models) and checkpoint loading (kron.io), which do not import each other
for it."""
from __future__ import annotations

import torch

from .errors import ConfigError

__all__ = ["parse_dtype", "pick_device"]


def pick_device(pref: str | torch.device | None = "auto") -> torch.device:
    """"auto"/None -> cuda when available, else cpu; otherwise the named device ("cpu", "cuda:1", "meta", ...)."""
    if isinstance(pref, torch.device):
        return pref
    if pref is None or pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(pref)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {pref!r} is not a torch device; use 'auto', 'cpu', 'cuda', 'cuda:N' or "
                          "'meta'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {pref!r} was requested but CUDA is not available; use 'auto' or 'cpu'")
    return device


def parse_dtype(dtype) -> torch.dtype | None:
    """None, a torch.dtype, or a name ("float32", "bfloat16", "fp16", ...)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "float64": torch.float64,
             "fp64": torch.float64, "double": torch.float64, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    key = str(dtype).removeprefix("torch.").lower()
    if key not in names:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of float32, bfloat16, float16, float64")
    return names[key]


# ----------------------------------------------------------------------------------------------- configs
