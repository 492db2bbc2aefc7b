"""Group-wise symmetric 4-bit quantisation and its nibble packing: the pure functions behind `quantize: int4`.

A tensor's last axis (the input side of a weight, as int8's rows) is cut into groups of `group_size` consecutive
elements; the last group is shorter when the row length is not a multiple of it, and a row shorter than the group
size is one group. Each group has one float32 scale s = max|group| / 7 (1 for an all-zero group) and its elements
are q = round(w / s) clamped to [-7, 7] (-8 unused, so that -q is always representable, as int8 leaves -128), so
|w − q·s| <= s / 2 element-wise. Storage: q + 8 in a nibble, two per byte along the last axis (element 2i in the low
nibble, 2i+1 in the high one; an odd row padded with q = 0), a uint8 tensor of shape (..., ceil(n / 2)).

These are also what a closed-form damage estimate of a matrix in 4 bits should call, e.g.
`dequantize_groups(*quantize_groups(W, 4, 128), group_size=128)` is W as a 4-bit layer would run it.
"""
from __future__ import annotations

import torch

__all__ = ["DEFAULT_GROUP_SIZE", "dequantize_groups", "dequantize_int4", "group_count", "pack_int4",
           "packed_length", "quantize_groups", "quantize_int4", "unpack_int4"]

DEFAULT_GROUP_SIZE = 128  # elements per 4-bit scale along the input side (the common choice of GPTQ/AWQ)
ZERO_NIBBLE = 8  # the stored nibble of q = 0 (q + 8): padding, and the value of an empty (unloaded) layer


def group_count(n: int, group_size: int | None) -> int:
    """Scales per row of length n: ceil(n / group_size) (a shorter row is one group); 1 for group_size None."""
    return 1 if group_size is None else max(-(-n // group_size), 1)


def packed_length(n: int) -> int:
    """Bytes per row of n 4-bit values: ceil(n / 2)."""
    return -(-n // 2)


def _grouped(x: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, int]:
    """x (..., n) zero-padded to whole groups and viewed as (..., groups, group_size); returns it and n."""
    n = x.shape[-1]
    g = n if group_size is None else min(group_size, n)
    groups = group_count(n, group_size)
    pad = groups * g - n
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], groups, g), n


def quantize_groups(w: torch.Tensor, bits: int = 4, group_size: int | None = DEFAULT_GROUP_SIZE
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric `bits`-bit quantisation of w (..., n) with one scale per group of `group_size` consecutive elements
    of the last axis (None: one per row), computed in float32.

    Returns (q, scale): q int8 of w's shape, values in [-(2^(bits-1) − 1), 2^(bits-1) − 1] (not packed; see
    `pack_int4`), scale float32 (..., ceil(n / group_size)). s = max|group| / qmax (1 for an all-zero group),
    q = round(w / s), so |w − q·s| <= s / 2 element-wise. bits=8, group_size=None is `layer.quantize_rows` with the
    scales given a trailing axis of 1."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
    qmax = 2 ** (bits - 1) - 1
    g, n = _grouped(w.detach().to(torch.float32), group_size)
    scale = g.abs().amax(dim=-1) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(g / scale.unsqueeze(-1)).clamp_(-qmax, qmax).to(torch.int8)
    return q.reshape(*q.shape[:-2], -1)[..., :n], scale


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, group_size: int | None = DEFAULT_GROUP_SIZE,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q · s with each element's group scale (the inverse of `quantize_groups`; same `group_size`), in `dtype`."""
    g, n = _grouped(q.to(torch.float32), group_size)
    if tuple(scale.shape) != tuple(g.shape[:-1]):
        raise ValueError(f"scales of shape {list(scale.shape)} do not fit values {list(q.shape)} in groups of "
                         f"{group_size} (need {list(g.shape[:-1])})")
    w = g * scale.to(torch.float32).unsqueeze(-1)
    return w.reshape(*w.shape[:-2], -1)[..., :n].to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Integer values in [-8, 7] (..., n) -> uint8 (..., ceil(n / 2)): q + 8 in a nibble, element 2i in the low
    nibble and 2i+1 in the high one; an odd row is padded with q = 0. ValueError for values out of range."""
    if q.is_floating_point() or q.dtype == torch.bool:
        raise ValueError(f"pack_int4 takes integer values, got {q.dtype}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"4-bit values must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    u = (q.to(torch.int16) + ZERO_NIBBLE).to(torch.uint8)
    if u.shape[-1] % 2:
        u = torch.nn.functional.pad(u, (0, 1), value=ZERO_NIBBLE)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (..., ceil(n / 2)) from `pack_int4` -> int8 values (..., n) in [-8, 7] (the padding nibble dropped)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed 4-bit values are uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_length(n):
        raise ValueError(f"{n} values pack into {packed_length(n)} bytes per row, got {packed.shape[-1]}")
    both = torch.stack([packed & 0x0F, packed >> 4], dim=-1)
    return (both.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.int8) - ZERO_NIBBLE)


def quantize_int4(w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., n) -> (packed uint8 (..., ceil(n / 2)), float32 scales (..., ceil(n / group_size))): what an int4
    layer stores for a weight tensor."""
    q, scale = quantize_groups(w, 4, group_size)
    return pack_int4(q), scale


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, n: int, group_size: int = DEFAULT_GROUP_SIZE,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight (..., n) of stored int4 values (the inverse of `quantize_int4`, n the logical row length)."""
    return dequantize_groups(unpack_int4(packed, n), scale, group_size, dtype)
