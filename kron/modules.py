"""The one inspector of a model's compressible matrices: module types, dense sizes, layer indices, and
`matrices(model, groups)` listing them as `Matrix` records — used by plans, the search space, the sensitivity
profile and structured pruning alike.

A matrix belongs to a group: a standard group of its family (`kron.vocab.Family.groups`: embedding, attention,
attention_output, ffn_in, ffn_out, each named by plan selectors) or a user group given by selectors (`modules=`).
A model of no known family has no standard groups; `matrices` then lists every linear layer as group "linear".

torch is imported only where a module's type must be checked, so the torch-free parts of kron (vocab, method
specs, the knapsack) and `analysis` can import `Matrix` and `layer_index`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from .errors import PlanError
from .selectors import selector_matches
from .vocab import Family, family_of

__all__ = ["LINEAR_GROUPS", "SUPPORTED_TYPES", "Matrix", "dense_dims", "family_of_model", "group_hits",
           "input_embedding_matrix", "layer_index", "matrices", "matrix_of", "module_type", "unsupported_message"]

LINEAR_GROUPS = ("attention", "attention_output", "ffn_in", "ffn_out")
SUPPORTED_TYPES = ("torch.nn.Linear", "transformers.pytorch_utils.Conv1D", "torch.nn.Embedding")


@dataclass(frozen=True)
class Matrix:
    """One compressible weight: dotted name, group, layer index (None outside the numbered layers, and for
    embeddings), kind ("linear" | "conv1d" | "embedding"), (m, n) = (out, in) — (vocabulary, width) for embeddings —
    and the equal output blocks of a fused projection (GPT-2's c_attn: 3)."""

    name: str
    group: str
    layer: int | None
    kind: str
    m: int
    n: int
    blocks: int = 1

    @property
    def block_dims(self) -> tuple[int, int]:
        """(rows, cols) of each output block."""
        return self.m // self.blocks, self.n


# ----------------------------------------------------------------------------------------------- one module


def module_type(module) -> str | None:
    """"linear", "conv1d" (transformers' Conv1D, weight stored in x out), "embedding", or None if unsupported."""
    from torch import nn

    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    # duck-typed so that kron does not import transformers just to recognise GPT-2's layer
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return "conv1d"
    return None


def dense_dims(module) -> tuple[int, int]:
    """(m, n) of the weight in kronsearch's orientation: (out, in) for linear layers, (vocab, dim) for embeddings."""
    kind = module_type(module)
    if kind == "embedding":
        return module.num_embeddings, module.embedding_dim
    if kind == "linear":
        return module.out_features, module.in_features
    if kind == "conv1d":
        return module.nf, module.weight.shape[0]
    raise PlanError(unsupported_message("?", module))


def layer_index(name: str) -> int | None:
    """The first all-digit component of a dotted module name (`transformer.h.3.attn` -> 3), or None."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def unsupported_message(name: str, module) -> str:
    """Why module `name` cannot be compressed: its type, a hint, and the supported types."""
    t = type(module)
    hint = ""
    if t.__name__.startswith(("Kronecker", "FusedKronecker")):
        hint = " (it is already compressed)"
    elif len(list(module.children())):
        hint = " (a container: select its linear layers instead, or narrow the pattern)"
    return (
        f"module {name} is a {t.__module__}.{t.__name__}{hint}, which cannot be compressed; supported types: "
        f"{', '.join(SUPPORTED_TYPES)}"
    )


def family_of_model(model) -> Family | None:
    """The family of a model: its config's model type, else the family whose selectors match most of its modules."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return family_of(model_type, [n for n, _ in model.named_modules() if n])


def matrix_of(name: str, module, group: str, family: Family | None) -> Matrix:
    """The Matrix record of one supported module (a fused projection's blocks from its family)."""
    kind = module_type(module)
    m, n = dense_dims(module)
    blocks = 1
    if family is not None and kind != "embedding":
        blocks = family.fused_blocks(name)
        if m % blocks:
            blocks = 1
    return Matrix(name, group, layer_index(name) if kind != "embedding" else None, kind, m, n, blocks)


# ----------------------------------------------------------------------------------------------- a model's matrices


def _supported(model) -> list[tuple[str, object]]:
    return [(n, m) for n, m in model.named_modules() if n and module_type(m) is not None]


def _output_embedding(model):
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def group_hits(model, groups: Sequence[str], modules: Mapping[str, Sequence[str]] | None = None,
               family: Family | None = None) -> dict[str, list[tuple[str, object]]]:
    """group -> the supported modules it matches, in model order: each standard group by its family's selectors
    (PlanError when the model has no known family), each user group (`modules`: name -> selectors) by its own. A
    module may appear under several groups here (the callers decide whether that is an error)."""
    family = family if family is not None else family_of_model(model)
    mods = _supported(model)
    out: dict[str, list] = {}
    for g in groups:
        if family is None:
            raise PlanError(f"group {g}: the model's family is not known (GPT-2, BERT and Llama families are); give "
                            "its matrices by selectors instead")
        sels = family.selectors(g)
        out[g] = [(n, m) for n, m in mods if any(selector_matches(s, n) for s in sels)]
    for g, sels in (modules or {}).items():
        out[g] = [(n, m) for n, m in mods if any(selector_matches(s, n) for s in sels)]
    return out


def matrices(model, groups: Sequence[str] = LINEAR_GROUPS, *, modules: Mapping[str, Sequence[str]] | None = None,
             any_linear: bool = False) -> list[Matrix]:
    """The model's matrices in `groups` (standard groups) and `modules` (user groups), in model order, the output
    embedding (LM head) left out; a module two groups match belongs to the first. any_linear: for a model of no
    known family, every linear layer (group "linear") instead of an error."""
    family = family_of_model(model)
    head = _output_embedding(model)
    if family is None and any_linear:
        return [matrix_of(n, m, "linear", None) for n, m in _supported(model)
                if m is not head and module_type(m) != "embedding"]
    owner: dict[str, str] = {}
    for g, hits in group_hits(model, groups, modules, family).items():
        for n, m in hits:
            if m is not head:
                owner.setdefault(n, g)
    return [matrix_of(n, m, owner[n], family) for n, m in _supported(model) if n in owner]


def input_embedding_matrix(model) -> Matrix | None:
    """The model's word embedding (`get_input_embeddings()`, where it is an nn.Embedding in the family's embedding
    group, or any for a model of no known family) as a Matrix of group "embedding", or None."""
    from torch import nn

    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    if not isinstance(emb, nn.Embedding):
        return None
    name = next((n for n, m in model.named_modules() if m is emb), None)
    if not name:
        return None
    family = family_of_model(model)
    if family is not None and family.group_of(name, ("embedding",)) is None:
        return None
    return matrix_of(name, emb, "embedding", family)
