"""What the search space needs from the teacher, read from its config on the `meta` device (no weights): its
compressible matrices per group (kron.vocab families, or user selectors), their shapes and fused blocks, and the
teacher's parameter and multiply-add counts."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from kron.errors import ConfigError
from kron.vocab import GROUPS, family_of

from .config import SpaceConfig

__all__ = ["Matrix", "ModelInfo", "inspect_model", "teacher_skeleton"]


@dataclass(frozen=True)
class Matrix:
    """One compressible weight of the teacher."""

    name: str
    group: str
    layer: int | None
    kind: str  # "linear" | "conv1d" | "embedding"
    m: int  # out features (vocab for embeddings)
    n: int  # in features (dim for embeddings)
    blocks: int = 1  # equal output blocks of a fused projection (GPT-2 c_attn: 3)

    @property
    def block_dims(self) -> tuple[int, int]:
        return self.m // self.blocks, self.n


@dataclass
class ModelInfo:
    """What the space needs from the teacher: its matrices and its counts before compression."""

    family: str | None
    model_type: str | None
    matrices: list[Matrix]
    layers: list[int]  # layer indices present in the model
    params: int
    params_excl_output_embedding: int
    macs: int
    tied_input_embedding: str | None  # name of the input embedding when the LM head shares its weight
    bytes: int = 0  # weight storage (kron.surgery.count_bytes)
    float_width: int = 4  # bytes per element of its (most common) float dtype
    # with prune in space.methods: (layer, part) -> {matrix name: its prune context (kron.methods.prune: part, side,
    # units, blocks; "bias": whether it has one)} for every attention ("heads") / FFN ("ffn") block of the model
    # (all its matrices, searched or not), or {"error": why} where the block cannot be pruned; None otherwise
    prune_blocks: dict | None = None


def inspect_model(model, space: SpaceConfig) -> ModelInfo:
    """List the teacher's matrices per group (model may live on the meta device)."""
    from kron.plan import dense_dims, layer_index, module_type, selector_matches
    from kron.surgery import count_bytes, count_params, input_embedding, macs_per_token, output_embedding

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    modules = [(n, m) for n, m in model.named_modules() if n and module_type(m) is not None]
    names = [n for n, _ in modules]
    fam = family_of(model_type, names)
    family = fam.name if fam is not None else None
    out_emb = output_embedding(model)
    in_emb = input_embedding(model)
    tied = (in_emb is not None and out_emb is not None and getattr(out_emb, "weight", None) is not None
            and out_emb.weight is getattr(in_emb, "weight", None))
    head_names = {n for n, m in modules if m is out_emb}
    in_name = next((n for n, m in modules if m is in_emb), None)

    wanted: list[tuple[str, Callable[[str], bool]]] = []
    for g in space.groups:
        if family is None:
            raise ConfigError(
                f"space.groups: cannot map groups to modules of model_type {model_type!r} (known families: GPT-2, "
                f"BERT, Llama); list the matrices with space.modules, e.g. {{my_group: ['re:.*\\.mlp\\..*']}}. "
                f"Module names look like: {', '.join(names[:6])}")
        pat = fam.patterns[g]
        wanted.append((g, lambda name, pat=pat: re.fullmatch(pat, name) is not None))
    for g, sels in (space.modules or {}).items():
        wanted.append((g, lambda name, sels=tuple(sels): any(selector_matches(s, name) for s in sels)))

    owner: dict[str, str] = {}
    matrices: list[Matrix] = []
    for g, match in wanted:
        hits = [(n, m) for n, m in modules if match(n)]
        if not hits:
            where = f"space.modules.{g}" if g not in GROUPS else f"space.groups: {g}"
            raise ConfigError(f"{where}: no compressible module of this model (model_type {model_type!r}) matches; "
                              f"module names look like: {', '.join(names[:8])}")
        for n, m in hits:
            if n in owner:
                raise ConfigError(f"space: module {n} is in two groups ({owner[n]} and {g}); each matrix may be "
                                  "searched by one group only")
            if n in head_names:
                raise ConfigError(f"space: {n} is the output embedding (LM head); it stays dense (the KnGPT2 "
                                  "convention) — drop it from the group")
            owner[n] = g
            kind = module_type(m)
            rows, cols = dense_dims(m)
            if g == "embedding" and kind != "embedding":
                raise ConfigError(f"space.groups: embedding matched {n}, a {type(m).__name__}, not an nn.Embedding")
            blocks = 1
            if fam is not None and kind != "embedding":
                for selector, b in fam.fused.items():
                    if selector_matches(selector, n):
                        blocks = b
            if rows % blocks:
                blocks = 1
            matrices.append(Matrix(n, g, layer_index(n) if kind != "embedding" else None, kind, rows, cols, blocks))
    layers = sorted({layer_index(n) for n in names if layer_index(n) is not None})
    return ModelInfo(
        family=family, model_type=model_type, matrices=matrices, layers=layers,
        params=count_params(model), params_excl_output_embedding=count_params(model, exclude_output_embedding=True),
        macs=macs_per_token(model), tied_input_embedding=in_name if tied else None, bytes=count_bytes(model),
        float_width=_float_width(model), prune_blocks=_prune_blocks(model) if "prune" in space.methods else None,
    )


def _prune_blocks(model) -> dict:
    """(layer, part) -> {name: prune context + "bias"} of every attention / FFN block (see ModelInfo.prune_blocks)."""
    from kron.methods import get_method
    from kron.methods.prune.structure import blocks_of

    method = get_method("prune")
    modules = dict(model.named_modules())
    out: dict = {}
    for key, names in blocks_of(model).items():
        block = {}
        for name in names:
            ctx = dict(method.plan_context(model, name, modules[name]))
            if ctx.get("error"):
                block = {"error": ctx["error"]}
                break
            ctx["bias"] = getattr(modules[name], "bias", None) is not None
            block[name] = ctx
        out[key] = block
    return out


def _float_width(model) -> int:
    sizes = [p.element_size() for p in model.parameters() if p.is_floating_point()]
    return max(set(sizes), key=sizes.count) if sizes else 4


def teacher_skeleton(trial) -> Any:
    """The teacher of a TrialConfig built on the meta device from its config alone (no weights are read)."""
    from kron.errors import UserError
    from kron.models import build_from_config, load_config, resolve_source

    try:
        src = resolve_source(trial.teacher)
        config = load_config(src, trust_remote_code=trial.trust_remote_code)
        task = "sequence-classification" if trial.glue is not None else "auto"
        return build_from_config(config, task=task, device="meta", trust_remote_code=trial.trust_remote_code)
    except UserError as exc:
        raise ConfigError(f"trial.teacher: {trial.teacher!r}: {exc}") from None
