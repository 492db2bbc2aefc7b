"""The project's shared vocabulary, in one torch-free module: model families, objectives, size axes and the
trial-summary schema.

Every package reads these names from here (`analysis` included, which must import neither torch nor Ray), so
adding a model family or an objective is one entry below, not a hunt through five files.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "DEMO",
    "FAMILIES",
    "GROUPS",
    "META_NAME",
    "OBJECTIVES",
    "REFERENCE_METHODS",
    "SCHEMA",
    "SIZE_AXES",
    "SIZE_OBJECTIVES",
    "STATUSES",
    "SUMMARY_NAME",
    "SUMMARY_REQUIRED_KEYS",
    "Family",
    "Objective",
    "family_of",
    "family_of_model_type",
    "latency_us_per_token",
]

# ----------------------------------------------------------------------------------------------- model families

# The standard matrix groups of a Transformer layer (plus the word embedding), in display order.
GROUPS = ("embedding", "attention", "attention_output", "ffn_in", "ffn_out")


@dataclass(frozen=True)
class Family:
    """An architecture family: which transformers model types belong to it and where its matrices live.

    patterns: group -> regex (full match on the dotted module name) of the group's matrices.
    fused: plan selector of fused projections -> number of equal output blocks (GPT-2's c_attn = [Q; K; V]: 3).
    layer_list: dotted suffix of the ModuleList holding the layers (GPT2LMHeadModel: transformer.h).
    attention / ffn_in / ffn_out selectors: plan selectors (kron.plan syntax) of those matrices, for presets.
    """

    name: str
    model_types: tuple[str, ...]
    patterns: dict
    fused: dict
    layer_list: str
    attention_selectors: tuple[str, ...]
    ffn_in_selectors: tuple[str, ...]
    ffn_out_selectors: tuple[str, ...]
    embedding_selector: str

    @property
    def linear_selectors(self) -> tuple[str, ...]:
        """Every attention and FFN matrix (what `uniform:`/`lowrank:` presets compress)."""
        return self.attention_selectors + self.ffn_in_selectors + self.ffn_out_selectors


FAMILIES: dict[str, Family] = {
    f.name: f for f in (
        Family(
            name="gpt2",
            model_types=("gpt2",),
            patterns={
                "embedding": r"(.*\.)?wte",
                "attention": r".*\.attn\.c_attn",
                "attention_output": r".*\.attn\.c_proj",
                "ffn_in": r".*\.mlp\.c_fc",
                "ffn_out": r".*\.mlp\.c_proj",
            },
            fused={"attn.c_attn": 3},
            layer_list="h",
            attention_selectors=("attn.c_attn", "attn.c_proj"),
            ffn_in_selectors=("mlp.c_fc",),
            ffn_out_selectors=("mlp.c_proj",),
            embedding_selector="wte",
        ),
        Family(
            name="bert",
            model_types=("bert", "roberta", "xlm-roberta", "electra", "camembert"),
            patterns={
                "embedding": r"(.*\.)?embeddings\.word_embeddings",
                "attention": r".*\.attention\.self\.(query|key|value)",
                "attention_output": r".*\.attention\.output\.dense",
                "ffn_in": r".*\.intermediate\.dense",
                "ffn_out": r".*\.layer\.\d+\.output\.dense",
            },
            fused={},
            layer_list="encoder.layer",
            attention_selectors=("attention.self.query", "attention.self.key", "attention.self.value",
                                 "attention.output.dense"),
            ffn_in_selectors=("intermediate.dense",),
            ffn_out_selectors=(r"re:(.*\.)?layer\.\d+\.output\.dense",),
            embedding_selector="embeddings.word_embeddings",
        ),
        Family(
            name="llama",
            model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2"),
            patterns={
                "embedding": r"(.*\.)?embed_tokens",
                "attention": r".*\.self_attn\.(q|k|v)_proj",
                "attention_output": r".*\.self_attn\.o_proj",
                "ffn_in": r".*\.mlp\.(gate|up)_proj",
                "ffn_out": r".*\.mlp\.down_proj",
            },
            fused={},
            layer_list="layers",
            attention_selectors=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
            ffn_in_selectors=("mlp.gate_proj", "mlp.up_proj"),
            ffn_out_selectors=("mlp.down_proj",),
            embedding_selector="embed_tokens",
        ),
    )
}


def family_of_model_type(model_type: str | None) -> Family | None:
    """The family a transformers `model_type` belongs to, or None."""
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    return None


def family_of(model_type: str | None, names: Sequence[str] = ()) -> Family | None:
    """The family of a model type; for an unknown type, the family whose group patterns match the most of the
    module `names` (a renamed or custom architecture with the usual layout), or None."""
    fam = family_of_model_type(model_type)
    if fam is not None or not names:
        return fam
    best, hits = None, 0
    for f in FAMILIES.values():
        n = sum(1 for name in names for p in f.patterns.values() if re.fullmatch(p, name))
        if n > hits:
            best, hits = f, n
    return best


def known_model_types() -> list[str]:
    return [t for f in FAMILIES.values() for t in f.model_types]


# ----------------------------------------------------------------------------------------------- objectives


@dataclass(frozen=True)
class Objective:
    """A search objective: the result column it reads, its direction (None: the trial's quality direction), a label
    for axes and tables, and whether it is known before training (from the plan alone)."""

    name: str
    column: str
    mode: str | None
    label: str
    known_before_training: bool


OBJECTIVES: dict[str, Objective] = {
    o.name: o for o in (
        Objective("quality", "quality", None, "quality", False),
        Objective("params", "params", "min", "parameters", True),
        Objective("params_excl_output_embedding", "params_excl_output_embedding", "min",
                  "parameters (excl. output embedding)", True),
        Objective("macs", "macs_per_token", "min", "MACs per token", True),
        # weight storage: each tensor's elements x its stored width (float32 4, int8 1 plus float32 scales)
        Objective("bytes", "bytes", "min", "weight storage (bytes)", True),
        Objective("latency", "latency_us_per_token", "min", "latency (µs per token)", False),
    )
}
SIZE_OBJECTIVES = tuple(k for k in OBJECTIVES if k != "quality")
# Result columns a Pareto front may use as its size axis (known before training, so comparable across searches).
SIZE_AXES = tuple(o.column for o in OBJECTIVES.values() if o.known_before_training)


def latency_us_per_token(throughput_tokens_per_s) -> float:
    """Microseconds per token from a measured throughput; NaN when there is none."""
    try:
        t = float(throughput_tokens_per_s)
    except (TypeError, ValueError):
        return math.nan
    return 1e6 / t if math.isfinite(t) and t > 0 else math.nan


# ----------------------------------------------------------------------------------------------- results on disk

SUMMARY_NAME = "trial_summary.json"  # one per trial, rewritten atomically at every evaluation
SCHEMA = "kronsearch.trial/1"
META_NAME = "search_meta.json"  # one per search folder
SUMMARY_REQUIRED_KEYS = ("schema", "trial_id", "method", "status", "quality_name", "quality_mode")
STATUSES = ("complete", "pruned", "diverged", "error", "running")
# Methods whose rows are reference points (baselines), not members of a search's front.
REFERENCE_METHODS = ("teacher", "preset", "lowrank", "layerdrop")

# The model name that stands for the small GPT-2 bundled with kronsearch.
DEMO = "demo"
