"""`QuantizedLinear`: any linear layer (nn.Linear, or a Kronecker / low-rank layer of another method) whose weight
tensors are stored as int8 with one float32 scale per output channel.

The wrapped layer (`inner`) keeps its own forward: at each call its weight tensors are dequantised (q · s) and put
in place for that call only, so one wrapper serves every structure. State-dict keys are the inner layer's own
(`<module>.inner.A` now int8) plus `<name>_scale` beside each; the int8 values and scales are the model's weights and
are saved and reloaded exactly (safetensors stores int8).

Execution: weight-only int8 by dequantising on the fly, on every device. Measured on this project's CPU (torch 2.13,
`benchmarks/int8_layer.py`, under load): PyTorch's weight-only kernel `aten._weight_int8pack_mm` runs float32 inputs
~85x slower than a float matmul here, and the dynamic-quantised linear (`torch.ops.quantized.linear_dynamic`, fbgemm)
is ~1.2x faster but also quantises the activations to 8 bits (~2% relative output error on a random layer) and its
API is deprecated; torchao is not installed. So the layer computes in float on dequantised weights: the saving is in
storage (bytes), not in speed, and quality is measured with exactly the stored int8 weights.

Quantisation-aware recovery (`enable_qat` / `disable_qat`): the layer gets float master weights (Parameters, what an
optimiser trains) and its forward fake-quantises them with a straight-through estimator (the forward sees the
quantised weights, the gradient passes to the masters unchanged). The int8 values and scales are recomputed from the
masters at every forward and in `state_dict`, which never holds the masters: a checkpoint taken during QAT is already
the int8 model, and loading one into a QAT layer sets the masters to its dequantised weights.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ...errors import CheckpointError

__all__ = ["QuantizedLinear", "dense_linear", "dequantize_rows", "disable_qat", "enable_qat", "quantize_rows"]

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
    return (q.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)).to(dtype)


class _FakeQuant(torch.autograd.Function):
    """Forward: the weight quantised and dequantised; backward: the gradient unchanged (straight-through)."""

    @staticmethod
    def forward(ctx, w):
        q, s = quantize_rows(w)
        return dequantize_rows(q, s, w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


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
    """A linear layer (`inner`) with int8 weight tensors and float32 per-row scales; its bias stays float.

    Build it with `from_module(inner)` (quantises the inner layer's current weights). `to_dense()` is the dequantised
    (out, in) weight; `macs_per_token` and `in/out_features` are the inner layer's.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.weight_names = tuple(n for n, _ in inner.named_parameters() if n.rsplit(".", 1)[-1] != "bias")
        if not self.weight_names:
            raise TypeError(f"a {type(inner).__name__} has no weight tensors to quantise")
        for name in self.weight_names:
            owner, attr = _owner(inner, name)
            p = owner._parameters.pop(attr)
            owner.register_buffer(attr, torch.zeros(p.shape, dtype=torch.int8, device=p.device))
            owner.register_buffer(attr + SUFFIX, torch.ones(p.shape[:-1], dtype=torch.float32, device=p.device))
        self.init_error: float | None = None
        self.init_source: str | None = getattr(inner, "init_source", None)
        self.qat = False
        self.master = nn.ParameterDict()  # float master weights, only while quantisation-aware training is on
        self._register_state_dict_hook(_drop_masters)
        self._register_load_state_dict_pre_hook(_check_loaded, with_module=True)
        self.register_load_state_dict_post_hook(_masters_from_loaded)

    @classmethod
    def from_module(cls, inner: nn.Module, *, quantize: bool = True, reference: nn.Module | None = None):
        """Wrap `inner`, quantising its weights (quantize=False: structure only, int8 zeros, for loading saved
        weights). reference: the dense module it stands for; init_error is then the relative weight error of the
        dequantised layer against it (structure and rounding together)."""
        weights = {n: inner.get_parameter(n).detach().clone() for n, _ in inner.named_parameters()
                   if n.rsplit(".", 1)[-1] != "bias"}
        layer = cls(inner)
        if quantize:
            layer.set_weights(weights)
            if reference is not None:
                from ..layers import linear_weight

                with torch.no_grad():
                    w = linear_weight(reference)[0].to(torch.float32)
                    layer.init_error = float((w - layer.to_full().to(torch.float32)).norm() / w.norm().clamp_min(1e-30))
        return layer

    # --------------------------------------------------------------------------------- weights

    def quantized(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Inner weight name -> (int8 tensor, float32 scales), the stored values."""
        out = {}
        for name in self.weight_names:
            owner, attr = _owner(self.inner, name)
            out[name] = (owner._buffers[attr], owner._buffers[attr + SUFFIX])
        return out

    def stored_weight_count(self) -> int:
        """Elements of the stored weights, counted as this layer's weight parameters (`kron.surgery.count_params`;
        0 while QAT masters, which are Parameters, stand for them)."""
        return 0 if self.qat else sum(q.numel() for q, _ in self.quantized().values())

    @torch.no_grad()
    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Quantise float weights (inner weight name -> tensor) into the stored int8 values and scales."""
        for name in self.weight_names:
            owner, attr = _owner(self.inner, name)
            q, s = quantize_rows(weights[name])
            owner._buffers[attr].copy_(q)
            owner._buffers[attr + SUFFIX].copy_(s)

    def _dequantized(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if self.qat:
            return {n: _FakeQuant.apply(self.master[_key(n)]) for n in self.weight_names}
        return {n: dequantize_rows(q, s, dtype) for n, (q, s) in self.quantized().items()}

    @contextmanager
    def _weights_in_place(self, dtype: torch.dtype):
        """The inner layer sees float weights (dequantised, or fake-quantised masters) for the duration."""
        saved = []
        try:
            for name, w in self._dequantized(dtype).items():
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
        return f"int8 per-output-channel, {len(self.weight_names)} tensor(s), qat={self.qat}"

    # --------------------------------------------------------------------------------- quantisation-aware training

    @torch.no_grad()
    def _refresh_from_masters(self) -> None:
        self.set_weights({n: self.master[_key(n)] for n in self.weight_names})

    def enable_qat(self) -> None:
        """Float master weights (trainable Parameters) from the current int8 weights; forward fake-quantises them."""
        if self.qat:
            return
        with torch.no_grad():
            for n, (q, s) in self.quantized().items():
                self.master[_key(n)] = nn.Parameter(dequantize_rows(q, s, self._float_dtype()))
        self.qat = True

    def disable_qat(self) -> None:
        """Quantise the masters into the stored int8 weights and drop them."""
        if not self.qat:
            return
        self._refresh_from_masters()
        self.master = nn.ParameterDict()
        self.qat = False


def _key(name: str) -> str:
    return name.replace(".", "__")


def _drop_masters(module: QuantizedLinear, state_dict, prefix, local_metadata):
    """state_dict hook: the saved weights are the int8 values (refreshed from the masters under QAT), never the
    float masters."""
    if module.qat:
        module._refresh_from_masters()
    for key in [k for k in state_dict if k.startswith(prefix + "master.")]:
        del state_dict[key]
    return state_dict


def _masters_from_loaded(module: QuantizedLinear, incompatible) -> None:
    """load_state_dict post-hook: masters are never in a checkpoint (not missing); under QAT they follow the loaded
    int8 weights."""
    for k in [k for k in incompatible.missing_keys if ".master." in f".{k}"]:
        incompatible.missing_keys.remove(k)
    if module.qat:
        with torch.no_grad():
            for n, (q, s) in module.quantized().items():
                module.master[_key(n)].copy_(dequantize_rows(q, s, module.master[_key(n)].dtype))


def enable_qat(model: nn.Module) -> int:
    """Turn on quantisation-aware training in every int8 layer of a model; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for m in layers:
        m.enable_qat()
    return len(layers)


def disable_qat(model: nn.Module) -> int:
    """Store every int8 layer's QAT masters as int8 and drop them; returns how many layers."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for m in layers:
        m.disable_qat()
    return len(layers)


def _check_loaded(module: QuantizedLinear, state_dict, prefix, local_metadata, strict, missing_keys,
                  unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook: CheckpointError naming the module when a saved int8 weight lacks its scales, its
    scales do not fit it, or it is not stored as int8 (copying floats into the int8 buffer would cast silently)."""
    mname = prefix.rstrip(".") or "(root)"
    for wname, (q, s) in module.quantized().items():
        key = f"{prefix}inner.{wname}"
        skey = key + SUFFIX
        if key in state_dict:
            if skey not in state_dict:
                raise CheckpointError(f"int8 module {mname}: the weight {key} has no scales ({skey} is missing)")
            if state_dict[key].dtype != torch.int8:
                raise CheckpointError(f"int8 module {mname}: the weight {key} is stored as "
                                      f"{str(state_dict[key].dtype).removeprefix('torch.')}, not int8")
        if skey in state_dict and tuple(state_dict[skey].shape) != tuple(s.shape):
            raise CheckpointError(f"int8 module {mname}: the scales {skey} have shape {list(state_dict[skey].shape)}, "
                                  f"its int8 weight {list(q.shape)} needs {list(s.shape)} (one per row)")
