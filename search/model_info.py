"""What the search space needs from the teacher, read from its config on the `meta` device (no weights): its
compressible matrices per group (kron.vocab families, or user selectors), their shapes and fused blocks, and the
teacher's parameter and multiply-add counts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kron.errors import ConfigError
from kron.modules import Matrix  # one Matrix type (kron.modules); importable here for searches pickled before
from kron.vocab import GROUPS

from .config import SpaceConfig

__all__ = ["Matrix", "ModelInfo", "inspect_model", "teacher_skeleton"]


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
    # per-block method (prune) of the space -> its view of the model's blocks (`Method.search_blocks`: for prune,
    # (layer, part) -> {matrix name: context} of every attention / FFN block, or {"error": why})
    block_contexts: dict | None = None


def inspect_model(model, space: SpaceConfig) -> ModelInfo:
    """List the teacher's matrices per group (model may live on the meta device)."""
    from kron.methods import get_method
    from kron.modules import family_of_model, group_hits, layer_index, matrix_of, module_type
    from kron.surgery import (count_bytes, count_params, float_width, input_embedding, macs_per_token,
                              output_embedding)

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    names = [n for n, m in model.named_modules() if n and module_type(m) is not None]
    fam = family_of_model(model)
    out_emb = output_embedding(model)
    in_emb = input_embedding(model)
    tied = (in_emb is not None and out_emb is not None and getattr(out_emb, "weight", None) is not None
            and out_emb.weight is getattr(in_emb, "weight", None))
    in_name = next((n for n, m in model.named_modules() if n and m is in_emb), None)
    if space.groups and fam is None:
        raise ConfigError(
            f"space.groups: cannot map groups to modules of model_type {model_type!r} (known families: GPT-2, "
            f"BERT, Llama); list the matrices with space.modules, e.g. {{my_group: ['re:.*\\.mlp\\..*']}}. "
            f"Module names look like: {', '.join(names[:6])}")
    owner: dict[str, str] = {}
    matrices: list[Matrix] = []
    for g, hits in group_hits(model, space.groups, space.modules, fam).items():
        if not hits:
            where = f"space.modules.{g}" if g not in GROUPS else f"space.groups: {g}"
            raise ConfigError(f"{where}: no compressible module of this model (model_type {model_type!r}) matches; "
                              f"module names look like: {', '.join(names[:8])}")
        for n, m in hits:
            if n in owner:
                raise ConfigError(f"space: module {n} is in two groups ({owner[n]} and {g}); each matrix may be "
                                  "searched by one group only")
            if m is out_emb:
                raise ConfigError(f"space: {n} is the output embedding (LM head); it stays dense (the KnGPT2 "
                                  "convention) — drop it from the group")
            owner[n] = g
            if g == "embedding" and module_type(m) != "embedding":
                raise ConfigError(f"space.groups: embedding matched {n}, a {type(m).__name__}, not an nn.Embedding")
            matrices.append(matrix_of(n, m, g, fam))
    layers = sorted({layer_index(n) for n in names if layer_index(n) is not None})
    return ModelInfo(
        family=fam.name if fam is not None else None, model_type=model_type, matrices=matrices, layers=layers,
        params=count_params(model), params_excl_output_embedding=count_params(model, exclude_output_embedding=True),
        macs=macs_per_token(model), tied_input_embedding=in_name if tied else None, bytes=count_bytes(model),
        float_width=float_width(model),
        block_contexts={name: get_method(name).search_blocks(model) for name in space.block_methods()},
    )


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
