"""Where the heads and FFN neurons of GPT-2, BERT-family and Llama-family models live, which ones a pruned block
keeps, and what the rest of the model must learn about it.

Blocks: a layer's attention block is its Q, K, V projections (GPT-2: the fused c_attn, 3 blocks) and the output
projection; its FFN block is the first FFN matrices (c_fc / intermediate.dense / gate_proj + up_proj) and the
second (c_proj / output.dense / down_proj). The matrices come from the family's group patterns (`kron.vocab`).
A unit is a head (under grouped-query attention: a key/value group, i.e. one K and V head and the query heads that
share it) or an FFN neuron; it owns rows of the "out" matrices and columns of the "in" matrix.

Importance of a unit (per block; `scope: global` compares blocks by each unit's share of its block's total):
* with calibration statistics (`init: data`): the expected squared norm of the unit's contribution to the block's
  output, E‖W_in[:, u] x_u‖² = tr(W_u S_uu W_uᵀ), S = E[x xᵀ] of the "in" matrix's input (`kron.calibration`);
  for a neuron S_jj·‖W_down[:, j]‖². Activation-based and gradient-free: the input second moments are already
  what data-aware init collects.
* without (`init: svd`): weight magnitude, ‖W_in[:, u]‖_F · ‖W_out[u, :]‖_F summed over the "out" matrices.
* `init: none` (building the structure to load saved weights into): the first `kept` units.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ...errors import PlanError
from ...modules import dense_dims, layer_index
from ...vocab import family_of_model_type, known_model_types
from .spec import PruneSpec, with_kept

__all__ = ["blocks_of", "check_blocks", "choose_units", "context", "fix_attention", "kept_heads", "merge_config"]

_ROLE = {"attention": ("heads", "out"), "attention_output": ("heads", "in"), "ffn_in": ("ffn", "out"),
         "ffn_out": ("ffn", "in")}
# model types whose attention cannot lose heads by slicing (a norm over all heads' projections together)
_NO_HEAD_PRUNING = {"olmo2": "its q_norm / k_norm normalise all heads' projections together"}


def _family(model):
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return config, family_of_model_type(model_type), model_type


def head_layout(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of a transformers config."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def context(model, name: str, module) -> dict:
    """The block of a matrix: part ("heads"/"ffn"), side ("out"/"in"), units, layer, blocks, unit_word; or
    {"error": why it cannot be pruned}."""
    config, family, model_type = _family(model)
    if family is None:
        return {"error": f"prune knows the attention and FFN blocks of GPT-2, BERT-family and Llama-family models "
                         f"(model types {', '.join(known_model_types())}); module {name} belongs to a "
                         f"{type(model).__name__} of model_type {model_type!r}"}
    group = family.group_of(name, tuple(_ROLE))
    layer = layer_index(name)
    if group is None or layer is None:
        return {"error": f"module {name} is not an attention or FFN matrix of a {family.name} layer: prune removes "
                         "heads from Q, K, V and the attention output, and neurons from the FFN matrices"}
    part, side = _ROLE[group]
    m, n = dense_dims(module)
    if part == "heads":
        if model_type in _NO_HEAD_PRUNING:
            return {"error": f"module {name}: {model_type} attention heads cannot be pruned ("
                             f"{_NO_HEAD_PRUNING[model_type]}); prune only its FFN (prune: {{ffn: ...}})"}
        heads, kv, _ = head_layout(config)
        word = "heads" if kv == heads else f"key/value groups ({heads // kv} query heads each)"
        return {"part": part, "side": side, "units": kv, "layer": layer, "blocks": family.fused_blocks(name),
                "unit_word": word}
    units = m if side == "out" else n
    return {"part": part, "side": side, "units": units, "layer": layer, "blocks": 1, "unit_word": "FFN neurons"}


def blocks_of(model) -> dict[tuple[int, str], list[str]]:
    """(layer, part) -> the names of the block's matrices, in model order."""
    _, family, _ = _family(model)
    out: dict[tuple[int, str], list[str]] = {}
    if family is None:
        return out
    # by name, whatever the module is now (a pruned or quantised layer of a compressed model included)
    for name, _ in model.named_modules():
        group = family.group_of(name, tuple(_ROLE)) if name else None
        layer = layer_index(name) if group else None
        if layer is not None:
            out.setdefault((layer, _ROLE[group][0]), []).append(name)
    return out


def _by_block(specs: Mapping[str, PruneSpec]) -> dict[tuple[int, str], list[str]]:
    out: dict[tuple[int, str], list[str]] = {}
    for name, spec in specs.items():
        out.setdefault((layer_index(name), spec.part), []).append(name)
    return out


def check_blocks(model, specs: Mapping[str, PruneSpec]) -> None:
    """PlanError unless every pruned block prunes all its matrices alike (same units kept, same scope)."""
    members = blocks_of(model)
    for (layer, part), names in _by_block(specs).items():
        expected = members.get((layer, part), [])
        stray = [n for n in names if n not in expected]
        if stray:
            raise PlanError(f"module {stray[0]} has a prune spec for {part}, but it is not "
                            f"{'an attention' if part == 'heads' else 'an FFN'} matrix of layer {layer} of this "
                            f"{type(model).__name__}")
        missing = [n for n in expected if n not in specs]
        what = "attention heads" if part == "heads" else "FFN neurons"
        if missing:
            raise PlanError(f"prune {part} of layer {layer}: the plan prunes {', '.join(names)} but not "
                            f"{', '.join(missing)}; removing {what} takes every matrix of the block (select them "
                            "together, e.g. the family's attention or FFN selectors)")
        kinds = {(specs[n].units, specs[n].kept, specs[n].scope) for n in names}
        if len(kinds) > 1:
            got = ", ".join(f"{n}: {specs[n].kept} of {specs[n].units} ({specs[n].scope})" for n in names)
            raise PlanError(f"prune {part} of layer {layer}: its matrices must keep the same {what}; got {got}")


# ----------------------------------------------------------------------------------------------- importance


def _in_out(model, names: Sequence[str], specs) -> tuple[str, list[str]]:
    ins = [n for n in names if specs[n].side == "in"]
    return ins[0], [n for n in names if specs[n].side == "out"]


def _unit_view(W: torch.Tensor, side: str, blocks: int, units: int) -> torch.Tensor:
    """The weight's pruned side as (units, the rest): rows/columns of unit u gathered in row u."""
    X = W if side == "out" else W.T  # (pruned side, other side)
    size, other = X.shape
    width = size // (blocks * units)
    return X.reshape(blocks, units, width, other).permute(1, 0, 2, 3).reshape(units, -1)


@torch.no_grad()
def _scores(modules: Mapping[str, nn.Module], names: Sequence[str], specs, calib) -> torch.Tensor:
    """Importance of each unit of one block (higher = more important)."""
    from ..layers import linear_weight

    in_name, out_names = _in_out(None, names, specs)
    spec = specs[in_name]
    W_in = linear_weight(modules[in_name])[0].detach().double()  # (out, in): units own its columns
    units = spec.units
    width = W_in.shape[1] // units
    if calib is not None:
        S = calib.S(in_name).to(W_in.device, torch.float64)
        Wu = W_in.reshape(W_in.shape[0], units, width)  # (out, U, w)
        idx = torch.arange(units, device=S.device)
        S_blocks = S.reshape(units, width, units, width)[idx, :, idx, :]  # (U, w, w): each unit's own block
        return torch.einsum("oui,uij,ouj->u", Wu, S_blocks, Wu)
    score = _unit_view(W_in, "in", 1, units).norm(dim=1)
    out_norm = torch.zeros_like(score)
    for n in out_names:
        W = linear_weight(modules[n])[0].detach().double()
        out_norm += _unit_view(W, "out", specs[n].blocks, units).norm(dim=1)
    return score * out_norm


def choose_units(model, specs: Mapping[str, PruneSpec], init: str, calib=None) -> dict[str, dict]:
    """Which units each pruned block keeps: name -> {"spec", "keep", "source"} for `build` (see the module
    docstring for the scores)."""
    modules = dict(model.named_modules())
    blocks = _by_block(specs)
    keep: dict[tuple[int, str], list[int]] = {}
    kept = {key: specs[names[0]].kept for key, names in blocks.items()}
    source = None
    if init != "none":
        source = "data" if init == "data" and calib is not None else "svd"
        scores = {key: _scores(modules, names, specs, calib if source == "data" else None)
                  for key, names in blocks.items()}
        for part in ("heads", "ffn"):  # scope global: the same total, redistributed by each unit's share of its block
            pooled = [key for key in blocks if key[1] == part and specs[blocks[key][0]].scope == "global"]
            if len(pooled) > 1:
                kept.update(_global_kept(pooled, scores, kept, specs, blocks))
        for key, s in scores.items():
            order = sorted(range(len(s)), key=lambda u: (-float(s[u]), u))
            keep[key] = sorted(order[: kept[key]])
    out: dict[str, dict] = {}
    for key, names in blocks.items():
        for n in names:
            spec = specs[n] if kept[key] == specs[n].kept else with_kept(specs[n], kept[key])
            out[n] = {"spec": spec, "keep": keep.get(key), "source": source}
    return out


def _global_kept(pooled, scores, kept, specs, blocks) -> dict:
    total_removed = sum(specs[blocks[k][0]].units - kept[k] for k in pooled)
    entries = []
    for k in pooled:
        s = scores[k].double()
        share = s / s.sum().clamp_min(1e-300)
        entries.extend((float(share[u]), k, u) for u in range(len(s)))
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    left = {k: specs[blocks[k][0]].units for k in pooled}
    removed = 0
    for _, k, _u in entries:
        if removed == total_removed:
            break
        if left[k] > 1:  # every layer keeps at least one unit
            left[k] -= 1
            removed += 1
    return left


# ----------------------------------------------------------------------------------------------- the rest of the model


def _pruned(model) -> dict:
    """Name -> PrunedLinear of every pruned matrix, named as the model's module (an int8 one's PrunedLinear is the
    wrapper's `inner`: listed under the wrapper's name, once)."""
    from ..base import structure_layer
    from .layer import PrunedLinear

    out, wrapped = {}, set()
    for name, module in model.named_modules():  # pre-order: a wrapper comes before the layer it wraps
        if id(module) in wrapped:
            continue
        layer = structure_layer(module)
        if layer is not module:
            wrapped.add(id(layer))
        if isinstance(layer, PrunedLinear):
            out[name] = layer
    return out


def fix_attention(model, names: Sequence[str]) -> None:
    """Tell each pruned attention module its head count (GPT-2 splits c_attn by `split_size`; BERT keeps
    `all_head_size`). Llama-family attention reshapes with -1 heads and prunes whole KV groups, so its
    `num_key_value_groups` stays right."""
    from ..base import structure_layer

    config, _, _ = _family(model)
    heads, kv, head_dim = head_layout(config)
    modules = dict(model.named_modules())
    for name in names:
        layer = structure_layer(modules[name])  # the PrunedLinear, also under int8
        if layer.part != "heads" or layer.side != "out":
            continue
        attn = modules[name.rpartition(".")[0]]
        q_heads = layer.kept * heads // kv
        for attr, value in (("num_heads", q_heads), ("num_attention_heads", q_heads), ("split_size", q_heads * head_dim),
                            ("all_head_size", q_heads * head_dim), ("num_key_value_heads", layer.kept)):
            if isinstance(getattr(attn, attr, None), int) and not isinstance(getattr(attn, attr), bool):
                setattr(attn, attr, value)


def kept_heads(model) -> list[list[int] | None]:
    """Per layer, the teacher's query heads the student's attention heads are (in order), or None where the layer
    keeps all its heads: the map attention distillation needs."""
    config, family, _ = _family(model)
    n_layers = getattr(config, "num_hidden_layers", None)
    if family is None or n_layers is None:
        return []
    heads, kv, head_dim = head_layout(config)
    group = heads // kv
    out: list[list[int] | None] = [None] * n_layers
    for name, layer in _pruned(model).items():
        idx = layer_index(name)
        if layer.part != "heads" or layer.side != "out" or idx is None or idx >= n_layers or out[idx] is not None:
            continue
        out[idx] = [g * group + j for g in layer.kept_units() for j in range(group)]
    return out


def merge_config(model) -> dict:
    """Config entries that make `from_pretrained` rebuild a merged pruned model (one FFN width and, for
    Llama-family, one head count for all layers); PlanError naming the layers and modules where the config cannot
    (the same whether the pruned matrices are int8 or float)."""
    config, family, model_type = _family(model)
    pruned = _pruned(model)
    if not pruned:
        return {}
    blocks = blocks_of(model)
    modules = dict(model.named_modules())
    cls = type(config).__name__
    out: dict = {}
    widths: dict[int, int] = {}
    kv_kept: dict[int, int] = {}
    heads, kv, head_dim = head_layout(config)
    for (layer, part), names in blocks.items():
        first = names[0]
        if part == "ffn":
            widths[layer] = pruned[first].kept if first in pruned else _rows(modules[first])
        elif first in pruned:
            kv_kept[layer] = pruned[first].kept
        else:
            kv_kept[layer] = kv
    if any(pruned[n].part == "ffn" for n in pruned):
        if len(set(widths.values())) > 1:
            raise PlanError(f"merge: the FFN keeps {_by_value(widths)} neurons ({_modules(pruned, 'ffn')}); a {cls} "
                            "has one intermediate size for all layers, so from_pretrained could not rebuild the "
                            "merged model. Prune every layer's FFN to the same width (scope: layer, one fraction), or "
                            "keep the kronsearch folder (load_compressed)")
        out[family.ffn_width_key] = next(iter(widths.values()))
    if any(pruned[n].part == "heads" for n in pruned):
        if family.head_keys is None:
            raise PlanError(f"merge: layers {sorted(k for k, v in kv_kept.items() if v != kv)} keep fewer attention "
                            f"heads ({_modules(pruned, 'heads')}), which a {cls} cannot describe (its head size is "
                            "hidden_size / heads, and transformers no longer stores pruned_heads), so from_pretrained "
                            "could not rebuild the merged model. Keep the kronsearch folder (load_compressed; its "
                            "pruned layers are plain dense matmuls), or prune only the FFN for a mergeable model")
        if len(set(kv_kept.values())) > 1:
            raise PlanError(f"merge: the attention keeps {_by_value(kv_kept)} key/value heads "
                            f"({_modules(pruned, 'heads')}); a {cls} has one head count for all layers, so "
                            "from_pretrained could not rebuild the merged model. Prune every layer's heads alike, or "
                            "keep the kronsearch folder (load_compressed)")
        k = next(iter(kv_kept.values()))
        out.update(zip(family.head_keys, (k * heads // kv, k, head_dim)))
    return out


def _rows(module) -> int:
    """Output rows of an unpruned block's first matrix (dense, or compressed by another method)."""
    try:
        return dense_dims(module)[0]
    except PlanError:
        return int(module.out_features)


def _modules(pruned: Mapping, part: str, count: int = 3) -> str:
    """"modules a, b, c ..." of the pruned matrices of one part, for error messages."""
    names = [n for n, layer in pruned.items() if layer.part == part]
    return f"module{'s' if len(names) > 1 else ''} {', '.join(names[:count])}{' ...' if len(names) > count else ''}"


def _by_value(per_layer: Mapping[int, int]) -> str:
    groups: dict[int, list[int]] = {}
    for layer, v in sorted(per_layer.items()):
        groups.setdefault(v, []).append(layer)
    return "; ".join(f"{v} in layers {ls}" for v, ls in groups.items())
