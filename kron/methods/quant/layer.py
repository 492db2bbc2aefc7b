"""`QuantizedLinear`: any linear layer (nn.Linear, or a Kronecker / low-rank layer of another method) whose weight
tensors are stored as int8 with one float32 scale per output channel, or (bits=4) as packed 4-bit values with one
float32 scale per group of `group_size` inputs (`packing`: a uint8 tensor (..., ceil(n / 2)) under the weight's own
name, its scales (..., ceil(n / group_size)) under `<name>_scale`; safetensors stores uint8).

The wrapped layer (`inner`) keeps its own forward: at each call its weight tensors are dequantised (q · s) and put
in place for that call only, so one wrapper serves every structure. State-dict keys are the inner layer's own
(`<module>.inner.A` now int8) plus `<name>_scale` beside each; the int8 values and scales are the model's weights and
are saved and reloaded exactly (safetensors stores int8).

Execution: weight-only int8 by dequantising on the fly, on every device. Measured on this project's CPU (torch 2.13,
`benchmarks/int8_layer.py`, under load): PyTorch's weight-only kernel `aten._weight_int8pack_mm` runs float32 inputs
~85x slower than a float matmul here, and the dynamic-quantised linear (`torch.ops.quantized.linear_dynamic`, fbgemm)
is ~1.2x faster but also quantises the activations to 8 bits (~2% relative output error on a random layer) and its
API is deprecated; torchao is not installed. So the layer computes in float on dequantised weights: the saving is in
storage (bytes), not in speed, and quality is measured with exactly the stored int8 weights. 4-bit layers run the
same way (unpack the nibbles, then q · s per group): the layer's forward sees float weights either way.

Quantisation-aware recovery (`enable_qat` / `disable_qat`): the layer gets float master weights (Parameters, what an
optimiser trains) and its forward fake-quantises them with a straight-through estimator (the forward sees the
quantised weights, the gradient passes to the masters unchanged). The int8 values and scales are recomputed from the
masters at every forward and in `state_dict`, which never holds the masters: a checkpoint taken during QAT is already
the int8 model, and loading one into a QAT layer sets the masters to its dequantised weights. A 4-bit layer does the
same with its groups: the masters are float, the state dict holds only the packed values and scales.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from ...errors import CheckpointError
from .packing import (DEFAULT_GROUP_SIZE, ZERO_NIBBLE, dequantize_groups, dequantize_int4, group_count, pack_int4,
                      packed_length, quantize_groups, quantize_int4, unpack_int4)

__all__ = ["QuantizedLinear", "dense_linear", "dequantize_groups", "dequantize_int4", "dequantize_rows",
           "disable_qat", "enable_qat", "fake_quantize", "pack_int4", "quantize_groups", "quantize_int4",
           "quantize_rows", "unpack_int4"]

QMAX = 127  # symmetric: -127..127 (-128 unused, so that -q is always representable)
SUFFIX = "_scale"


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of a tensor (one scale per row: every axis but the last), computed in float32:
    s = max|row| / 127 (1 for an all-zero row), q = round(w / s). |w − q·s| <= s / 2 element-wise."""
    w32 = w.detach().to(torch.float32)
    scale = w32.abs().amax(dim=-1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w32 / scale.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q · s with one scale per row (the inverse of `quantize_rows`), in `dtype`."""
    return (q.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)).to(dtype)


def fake_quantize(w: torch.Tensor, bits: int = 8, group_size: int | None = None) -> torch.Tensor:
    """w quantised and dequantised as a layer of `bits` stores it (8: per row; 4: groups of `group_size`), no
    gradient: what the layer would compute with w as its weight."""
    if bits == 8:
        return dequantize_rows(*quantize_rows(w), w.dtype)
    return dequantize_groups(*quantize_groups(w, bits, group_size), group_size, w.dtype)


class _FakeQuant(torch.autograd.Function):
    """Forward: the weight quantised and dequantised; backward: the gradient unchanged (straight-through)."""

    @staticmethod
    def forward(ctx, w, bits=8, group_size=None):
        return fake_quantize(w, bits, group_size)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def dense_linear(module: nn.Module) -> nn.Linear:
    """An nn.Linear copy of an nn.Linear or GPT-2 Conv1D (weight in the (out, in) orientation), same device/dtype."""
    from ..layers import linear_weight

    weight, bias = linear_weight(module)
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (root.get_submodule(path) if path else root), attr


class QuantizedLinear(nn.Module):
    """A linear layer (`inner`) with int8 weight tensors and float32 per-row scales (bits=8), or packed 4-bit weight
    tensors and float32 per-group scales (bits=4, groups of `group_size` along the input side); its bias stays float.

    Build it with `from_module(inner)` (quantises the inner layer's current weights). `to_dense()` is the dequantised
    (out, in) weight; `macs_per_token` and `in/out_features` are the inner layer's.
    """

    def __init__(self, inner: nn.Module, bits: int = 8, group_size: int | None = None):
        super().__init__()
        if bits == 4:
            group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
            if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
                raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        elif bits == 8:
            if group_size is not None:
                raise ValueError(f"8-bit weights have one scale per row, not groups (got group_size={group_size!r})")
        else:
            raise ValueError(f"bits must be 8 or 4, got {bits!r}")
        self.bits, self.group_size = bits, group_size
        self.inner = inner
        self.weight_names = tuple(n for n, _ in inner.named_parameters() if n.rsplit(".", 1)[-1] != "bias")
        if not self.weight_names:
            raise TypeError(f"a {type(inner).__name__} has no weight tensors to quantise")
        # the logical (float) shape of each weight: a packed 4-bit buffer does not tell its odd row length
        self.weight_shapes: dict[str, tuple[int, ...]] = {}
        for name in self.weight_names:
            owner, attr = _owner(inner, name)
            p = owner._parameters.pop(attr)
            self.weight_shapes[name] = tuple(p.shape)
            owner.register_buffer(attr, self._empty_values(tuple(p.shape), p.device))
            owner.register_buffer(attr + SUFFIX, torch.ones(self._scale_shape(name), dtype=torch.float32,
                                                            device=p.device))
        self.init_error: float | None = None
        self.init_source: str | None = getattr(inner, "init_source", None)
        self.qat = False
        self.master = nn.ParameterDict()  # float master weights, only while quantisation-aware training is on
        self._register_state_dict_hook(_drop_masters)
        self._register_load_state_dict_pre_hook(_check_loaded, with_module=True)
        self.register_load_state_dict_post_hook(_masters_from_loaded)

    @classmethod
    def from_module(cls, inner: nn.Module, *, quantize: bool = True, reference: nn.Module | None = None,
                    bits: int = 8, group_size: int | None = None):
        """Wrap `inner`, quantising its weights (quantize=False: structure only, zero values, for loading saved
        weights). reference: the dense module it stands for; init_error is then the relative weight error of the
        dequantised layer against it (structure and rounding together). bits 8 or 4 (group_size: None = 128)."""
        weights = {n: inner.get_parameter(n).detach().clone() for n, _ in inner.named_parameters()
                   if n.rsplit(".", 1)[-1] != "bias"}
        layer = cls(inner, bits=bits, group_size=group_size)
        if quantize:
            layer.set_weights(weights)
            if reference is not None:
                from ..layers import linear_weight

                with torch.no_grad():
                    w = linear_weight(reference)[0].to(torch.float32)
                    layer.init_error = float((w - layer.to_full().to(torch.float32)).norm() / w.norm().clamp_min(1e-30))
        return layer

    # --------------------------------------------------------------------------------- weights

    @property
    def quant_name(self) -> str:
        """ "int8" or "int4": the storage as the spec's `method` and error messages name it."""
        return f"int{self.bits}"

    def _empty_values(self, shape: tuple[int, ...], device) -> torch.Tensor:
        if self.bits == 8:
            return torch.zeros(shape, dtype=torch.int8, device=device)
        return torch.full((*shape[:-1], packed_length(shape[-1])), ZERO_NIBBLE * 0x11, dtype=torch.uint8,
                          device=device)

    def _scale_shape(self, name: str) -> tuple[int, ...]:
        shape = self.weight_shapes[name]
        if self.bits == 8:
            return shape[:-1]
        return (*shape[:-1], group_count(shape[-1], self.group_size))

    def _values_shape(self, name: str) -> tuple[int, ...]:
        shape = self.weight_shapes[name]
        return shape if self.bits == 8 else (*shape[:-1], packed_length(shape[-1]))

    def quantized(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Inner weight name -> (stored values, float32 scales): int8 values (bits 8) or packed uint8 (bits 4)."""
        out = {}
        for name in self.weight_names:
            owner, attr = _owner(self.inner, name)
            out[name] = (owner._buffers[attr], owner._buffers[attr + SUFFIX])
        return out

    def stored_weight_count(self) -> int:
        """Elements of the stored weights, counted as this layer's weight parameters (`kron.surgery.count_params`;
        0 while QAT masters, which are Parameters, stand for them): the logical count, two per packed 4-bit byte."""
        return 0 if self.qat else sum(math.prod(self.weight_shapes[n]) for n in self.weight_names)

    def _quantize(self, name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bits == 8:
            return quantize_rows(w)
        return quantize_int4(w, self.group_size)

    def _dequantize(self, name: str, q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.bits == 8:
            return dequantize_rows(q, s, dtype)
        return dequantize_int4(q, s, self.weight_shapes[name][-1], self.group_size, dtype)

    @torch.no_grad()
    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Quantise float weights (inner weight name -> tensor) into the stored values and scales."""
        for name in self.weight_names:
            owner, attr = _owner(self.inner, name)
            q, s = self._quantize(name, weights[name])
            owner._buffers[attr].copy_(q)
            owner._buffers[attr + SUFFIX].copy_(s)

    def _dequantized(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if self.qat:
            return {n: _FakeQuant.apply(self.master[_key(n)], self.bits, self.group_size) for n in self.weight_names}
        return {n: self._dequantize(n, q, s, dtype) for n, (q, s) in self.quantized().items()}

    @contextmanager
    def _weights_in_place(self, dtype: torch.dtype):
        """The inner layer sees float weights (dequantised, or fake-quantised masters) for the duration."""
        with self._in_place(self._dequantized(dtype)):
            yield

    @contextmanager
    def _in_place(self, tensors: dict[str, torch.Tensor]):
        saved = []
        try:
            for name, w in tensors.items():
                owner, attr = _owner(self.inner, name)
                saved.append((owner, attr, owner._buffers[attr]))
                owner._buffers[attr] = w
            yield
        finally:
            for owner, attr, q in saved:
                owner._buffers[attr] = q

    # --------------------------------------------------------------------------------- module interface

    @property
    def bias(self):
        return self.inner.bias

    @property
    def in_features(self) -> int:
        return self.inner.in_features

    @property
    def out_features(self) -> int:
        return self.inner.out_features

    @property
    def macs_per_token(self) -> int:
        if isinstance(self.inner, nn.Linear):
            return self.inner.in_features * self.inner.out_features
        return int(self.inner.macs_per_token)

    def _float_dtype(self) -> torch.dtype:
        b = self.inner.bias if isinstance(getattr(self.inner, "bias", None), torch.Tensor) else None
        return b.dtype if b is not None else torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qat:
            self._refresh_from_masters()
        with self._weights_in_place(x.dtype if x.is_floating_point() else self._float_dtype()):
            return self.inner(x)

    def to_dense(self) -> torch.Tensor:
        """The dequantised weight, (out, in) like nn.Linear.weight."""
        with self._weights_in_place(self._float_dtype()):
            if isinstance(self.inner, nn.Linear):
                return self.inner.weight
            return self.inner.to_dense()

    def to_full(self) -> torch.Tensor:
        """The dequantised weight at the size of the dense module it replaced: a pruned inner layer's `to_full`
        (zeros in the removed rows/columns), `to_dense` for every other structure."""
        full = getattr(self.inner, "to_full", None)
        if not callable(full):
            return self.to_dense()
        with self._weights_in_place(self._float_dtype()):
            return full()

    def extra_repr(self) -> str:
        if self.bits == 8:
            return f"int8 per-output-channel, {len(self.weight_names)} tensor(s), qat={self.qat}"
        return f"int4 groups of {self.group_size}, {len(self.weight_names)} tensor(s), qat={self.qat}"

    # --------------------------------------------------------------------------------- quantisation-aware training

    @torch.no_grad()
    def _refresh_from_masters(self) -> None:
        self.set_weights({n: self.master[_key(n)] for n in self.weight_names})

    def enable_qat(self) -> None:
        """Float master weights (trainable Parameters) from the current stored weights; forward fake-quantises
        them."""
        if self.qat:
            return
        with torch.no_grad():
            for n, (q, s) in self.quantized().items():
                self.master[_key(n)] = nn.Parameter(self._dequantize(n, q, s, self._float_dtype()))
        self.qat = True

    def disable_qat(self) -> None:
        """Quantise the masters into the stored weights and drop them."""
        if not self.qat:
            return
        self._refresh_from_masters()
        self.master = nn.ParameterDict()
        self.qat = False


def _key(name: str) -> str:
    return name.replace(".", "__")


def _drop_masters(module: QuantizedLinear, state_dict, prefix, local_metadata):
    """state_dict hook: the saved weights are the stored (int8 or packed 4-bit) values, refreshed from the masters
    under QAT, never the float masters."""
    if module.qat:
        module._refresh_from_masters()
    for key in [k for k in state_dict if k.startswith(prefix + "master.")]:
        del state_dict[key]
    return state_dict


def _masters_from_loaded(module: QuantizedLinear, incompatible) -> None:
    """load_state_dict post-hook: masters are never in a checkpoint (not missing); under QAT they follow the loaded
    stored weights."""
    for k in [k for k in incompatible.missing_keys if ".master." in f".{k}"]:
        incompatible.missing_keys.remove(k)
    if module.qat:
        with torch.no_grad():
            for n, (q, s) in module.quantized().items():
                module.master[_key(n)].copy_(module._dequantize(n, q, s, module.master[_key(n)].dtype))


def enable_qat(model: nn.Module) -> int:
    """Turn on quantisation-aware training in every quantised (int8 or int4) layer of a model; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for m in layers:
        m.enable_qat()
    return len(layers)


def disable_qat(model: nn.Module) -> int:
    """Store every quantised layer's QAT masters as its int8 / int4 values and drop them; returns how many layers."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for m in layers:
        m.disable_qat()
    return len(layers)


def _check_loaded(module: QuantizedLinear, state_dict, prefix, local_metadata, strict, missing_keys,
                  unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook: CheckpointError naming the module when a saved weight lacks its scales, its
    scales do not fit it, or it is not stored as int8 / packed uint8 (copying floats into the buffer would cast
    silently)."""
    mname = prefix.rstrip(".") or "(root)"
    if module.bits == 8:
        want, stored, per = torch.int8, "int8", "one per row"
    else:
        want, stored, per = torch.uint8, "uint8 (packed int4)", f"one per row and group of {module.group_size}"
    label = module.quant_name
    for wname, (q, s) in module.quantized().items():
        key = f"{prefix}inner.{wname}"
        skey = key + SUFFIX
        if key in state_dict:
            if skey not in state_dict:
                raise CheckpointError(f"{label} module {mname}: the weight {key} has no scales ({skey} is missing)")
            if state_dict[key].dtype != want:
                raise CheckpointError(f"{label} module {mname}: the weight {key} is stored as "
                                      f"{str(state_dict[key].dtype).removeprefix('torch.')}, not {stored}")
            if module.bits == 4 and tuple(state_dict[key].shape) != tuple(q.shape):
                raise CheckpointError(f"{label} module {mname}: the packed weight {key} has shape "
                                      f"{list(state_dict[key].shape)}, its {list(module.weight_shapes[wname])} "
                                      f"weight packs into {list(q.shape)}")
        if skey in state_dict and tuple(state_dict[skey].shape) != tuple(s.shape):
            raise CheckpointError(f"{label} module {mname}: the scales {skey} have shape "
                                  f"{list(state_dict[skey].shape)}, its {label} weight "
                                  f"{list(module._values_shape(wname))} needs {list(s.shape)} ({per})")
