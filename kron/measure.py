"""The model-level measure of a compressed model against its teacher on held-out batches: KL(teacher ‖ student) of
the next-token distributions of a causal LM (each position, padding left out) or of a classifier's outputs; for a
model without logits, the relative squared error of its last hidden state. The sensitivity profile, the search's
automatic seeds and `kron.refine` judge plans by it.

Prefix replay: the reference pass keeps every transformer layer's output, so a measurement that changed only layer
k and later runs the model from layer k (see `ModelMeasure`).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DataError, PlanError

__all__ = ["REPLAY_MAX_BYTES", "ModelMeasure", "batch_tokens", "budgeted_batches", "first_rows", "spread_indices",
           "swap_module"]


def _model_inputs(batch, device, extra: Mapping | None = None):
    if isinstance(batch, torch.Tensor):
        kw, mask = {"input_ids": batch.to(device)}, None
    else:
        kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "labels"}
        mask = kw.get("attention_mask")
    if extra:
        kw.update(extra)
    return kw, mask


def batch_tokens(batch) -> int:
    """The tokens of a held-out batch a measure counts: the attention mask's ones, else every input id."""
    ids = batch if isinstance(batch, torch.Tensor) else batch.get("input_ids")
    mask = None if isinstance(batch, torch.Tensor) else batch.get("attention_mask")
    return int(mask.sum().item()) if mask is not None else int(ids.numel())


def budgeted_batches(batches: Sequence, max_tokens: int | None, whole_batches: bool = False):
    """(batch, its tokens) for each held-out batch a measure with the budget `max_tokens` reads: batches until the
    budget is reached, the last cut to its first rows (`first_rows`) unless `whole_batches`."""
    seen = 0
    for b in batches:
        if max_tokens is not None and seen >= max_tokens:
            break
        if max_tokens is not None and not whole_batches:
            b = first_rows(b, max_tokens - seen)
        n = batch_tokens(b)
        seen += n
        yield b, n


def first_rows(batch, tokens: int):
    """The batch cut to its first rows holding at most `tokens` tokens (padding not counted; at least one row), so
    that a token budget smaller than one batch is honoured."""
    ids = batch if isinstance(batch, torch.Tensor) else batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() < 2:
        return batch
    mask = None if isinstance(batch, torch.Tensor) else batch.get("attention_mask")
    per_row = (mask.reshape(mask.shape[0], -1).sum(1) if isinstance(mask, torch.Tensor)
               else torch.full((ids.shape[0],), ids[0].numel()))
    k = max(int((per_row.cumsum(0) <= tokens).sum().item()), 1)
    if k >= ids.shape[0]:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch[:k]
    n = ids.shape[0]
    return {key: v[:k] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
            for key, v in batch.items()}


def _no_cache_kwargs(model: nn.Module) -> dict:
    """{"use_cache": False} when the model's forward takes it: no KV cache is built for a measurement pass (it
    costs memory, and a replayed layer prefix would leave it half filled)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


REPLAY_MAX_BYTES = 1 << 30  # layer outputs kept for prefix replay: at most this much (else every pass runs it all)


class ModelMeasure:
    """KL(teacher ‖ student) on held-out batches: next-token distributions of a causal LM (each position, padding
    left out), or a classifier's outputs; a model without logits: relative squared error of the last hidden state.

    Prefix replay: the reference pass keeps every transformer layer's output (`kron.baselines.layer_list`; at most
    REPLAY_MAX_BYTES, else replay is off). A measurement told which modules differ from the reference
    (`changed`: dotted names) runs the model from the first layer holding one of them: the layers before it return
    their recorded outputs instead of computing them — the same numbers, since those layers are the reference's.
    A changed module outside the layers (embeddings, head) or `changed=None` runs everything.

    max_tokens: at most this many held-out tokens (the last batch used is cut to its first rows, at least one);
    whole_batches: the older rule — whole batches until the budget is reached (the search's seeds keep it).
    """

    def __init__(self, model: nn.Module, batches: Sequence, max_tokens: int | None = None, *, replay: bool = True,
                 whole_batches: bool = False):
        self.model = model
        dev = next(model.parameters()).device
        self.device = dev
        self.batches, self.ref = [], []
        self.kind = None
        self.extra = _no_cache_kwargs(model)
        self.layers_name, self.layers = self._layers() if replay else (None, None)
        self.recorded: list[list] = []  # per batch, per layer: the layer's output in the reference pass
        self.replays = 0  # measurements that skipped at least one layer
        recording: list = []
        hooks = [layer.register_forward_hook(lambda _m, _a, out: recording.append(out))
                 for layer in (self.layers or [])]
        seen, kept = 0, 0
        try:
            with torch.no_grad():
                for b, n in budgeted_batches(batches, max_tokens, whole_batches):
                    kw, mask = _model_inputs(b, dev, self.extra)
                    recording.clear()
                    out = model(**kw)
                    logits = getattr(out, "logits", None)
                    if logits is not None:
                        self.kind = "kl"
                        ref = torch.log_softmax(logits.float(), dim=-1)
                    else:
                        self.kind = "hidden_rel_mse"
                        ref = out.last_hidden_state.float() if hasattr(out, "last_hidden_state") else out[0].float()
                    self.batches.append((kw, mask))
                    self.ref.append(ref)
                    if self.layers is not None:
                        kept += sum(_nbytes(o) for o in recording)
                        if len(recording) != len(self.layers) or kept > REPLAY_MAX_BYTES:
                            self.layers_name, self.layers, self.recorded = None, None, []  # replay off
                        else:
                            self.recorded.append(list(recording))
                    seen += n
        finally:
            for h in hooks:
                h.remove()
        if not self.batches:
            raise DataError("no held-out batches for the model-level measure")
        self.tokens = seen

    def _layers(self):
        from .baselines import layer_list

        try:
            name, layers = layer_list(self.model)
        except PlanError:
            return None, None
        return name, list(layers)

    def start_layer(self, changed) -> int:
        """The first layer a measurement with these modules changed must run (0: all of them)."""
        if changed is None or self.layers is None:
            return 0
        prefix = self.layers_name + "."
        start = len(self.layers)
        for name in changed:
            if not name.startswith(prefix):
                return 0
            index = name[len(prefix):].split(".", 1)[0]
            if not index.isdigit():
                return 0
            start = min(start, int(index))
        return start

    def with_layers(self, layers: Mapping[str, nn.Module]) -> float:
        """The measure with each module named in `layers` swapped for its layer (the others as they are), replaying
        the unchanged prefix; the originals are put back afterwards, also on error."""
        swapped = []
        try:
            for name, layer in layers.items():
                swapped.append((name, swap_module(self.model, name, layer)))
            return float(self(changed=list(layers)))
        finally:
            for name, old in reversed(swapped):
                swap_module(self.model, name, old)

    def __call__(self, changed: Sequence[str] | None = None) -> float:
        """The measure of the model as it is now; `changed`: the modules that differ from the reference pass (None:
        unknown, run every layer)."""
        start = self.start_layer(changed)
        if start > 0:
            self.replays += 1
        num, den = 0.0, 0.0
        current: list = [None]
        stubbed = []
        try:
            for layer in self.layers[:start] if start else ():
                stubbed.append((layer, layer.__dict__.get("forward")))
                layer.forward = lambda *a, **k: current[0]
            with torch.no_grad():
                for i, ((kw, mask), ref) in enumerate(zip(self.batches, self.ref)):
                    if start:
                        current[0] = self.recorded[i][start - 1]
                    out = self.model(**kw)
                    if self.kind == "kl":
                        logq = torch.log_softmax(out.logits.float(), dim=-1)
                        # exp(ref)·(ref − logq) in one elementwise pass (no exp(ref) / difference temporaries of
                        # tokens x vocab floats); per position, or per sequence for a classifier
                        kl = F.kl_div(logq, ref, reduction="none", log_target=True).sum(-1)
                        if mask is not None and kl.dim() == 2 and tuple(kl.shape) == tuple(mask.shape):
                            w = mask.to(kl.dtype)
                            num += float((kl * w).sum().item())
                            den += float(w.sum().item())
                        else:
                            num += float(kl.sum().item())
                            den += kl.numel()
                    else:
                        h = out.last_hidden_state.float() if hasattr(out, "last_hidden_state") else out[0].float()
                        num += float(((h - ref) ** 2).sum().item())
                        den += float((ref ** 2).sum().item())
        finally:
            for layer, fwd in stubbed:
                if fwd is None:
                    del layer.forward
                else:
                    layer.forward = fwd
        return num / den if den > 0 else 0.0


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, Mapping):
        return sum(_nbytes(o) for o in obj.values())
    return 0


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def spread_indices(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), both ends included."""
    if k <= 0 or n == 0:
        return []
    if k >= n:
        return list(range(n))
    if k == 1:
        return [n // 2]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
