"""The project's shared vocabulary, in one torch-free module: model families, size axes, objectives and the
trial-summary schema.

Every package reads these names from here (`analysis` included, which must import neither torch nor Ray), so
adding a model family or an objective is one entry below, not a hunt through five files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .selectors import selector_matches

__all__ = [
    "DEMO",
    "DEMO_TEACHER_RELEASE",
    "FAMILIES",
    "GROUPS",
    "META_NAME",
    "OBJECTIVES",
    "REFERENCE_METHODS",
    "SCHEMA",
    "AXES",
    "RATIO",
    "RATIO_AXIS",
    "SIZE_AXES",
    "SIZE_OBJECTIVES",
    "STATUSES",
    "SUMMARY_NAME",
    "SUMMARY_REQUIRED_KEYS",
    "Family",
    "Objective",
    "SizeAxis",
    "family_of",
    "family_of_model_type",
    "latency_us_per_token",
    "size_axis",
]

# ----------------------------------------------------------------------------------------------- model families

# The standard matrix groups of a Transformer layer (plus the word embedding), in display order.
GROUPS = ("embedding", "attention", "attention_output", "ffn_in", "ffn_out")


@dataclass(frozen=True)
class Family:
    """An architecture family: which transformers model types belong to it and where its matrices live.

    groups: group -> the plan selectors (`kron.selectors` syntax) of the group's matrices; every module is named once,
        here, and presets, search groups, profiles, pruning and layer dropping derive what they need from it.
    fused: plan selector of fused projections -> number of equal output blocks (GPT-2's c_attn = [Q; K; V]: 3).
    layer_list: dotted suffix of the ModuleList holding the layers (GPT2LMHeadModel: transformer.h).
    ffn_width_key: the config key of the FFN width, which a merged FFN-pruned model sets.
    head_keys: the config keys (query heads, key/value heads, head size) a merged head-pruned model sets; None where
        the config cannot describe fewer heads (its head size is hidden / heads).
    """

    name: str
    model_types: tuple[str, ...]
    groups: dict
    fused: dict
    layer_list: str
    ffn_width_key: str = "intermediate_size"
    head_keys: tuple[str, str, str] | None = None

    def selectors(self, group: str) -> tuple[str, ...]:
        """The plan selectors of one group's matrices (none for a group the family does not have)."""
        return tuple(self.groups.get(group, ()))

    def group_of(self, name: str, groups: Sequence[str] = GROUPS) -> str | None:
        """The first of `groups` whose selectors match the dotted module name, or None."""
        return next((g for g in groups if any(selector_matches(s, name) for s in self.selectors(g))), None)

    def fused_blocks(self, name: str) -> int:
        """Equal output blocks of the module (GPT-2's c_attn: 3), 1 for an unfused one."""
        return next((b for sel, b in self.fused.items() if selector_matches(sel, name)), 1)

    @property
    def attention_selectors(self) -> tuple[str, ...]:
        """Q, K, V and the attention output (what the presets call the attention matrices)."""
        return self.selectors("attention") + self.selectors("attention_output")

    @property
    def ffn_in_selectors(self) -> tuple[str, ...]:
        return self.selectors("ffn_in")

    @property
    def ffn_out_selectors(self) -> tuple[str, ...]:
        return self.selectors("ffn_out")

    @property
    def embedding_selector(self) -> str:
        return self.selectors("embedding")[0]

    @property
    def linear_selectors(self) -> tuple[str, ...]:
        """Every attention and FFN matrix (what `uniform:`/`lowrank:` presets compress)."""
        return self.attention_selectors + self.ffn_in_selectors + self.ffn_out_selectors


FAMILIES: dict[str, Family] = {
    f.name: f for f in (
        Family(
            name="gpt2",
            model_types=("gpt2",),
            groups={"embedding": ("wte",), "attention": ("attn.c_attn",), "attention_output": ("attn.c_proj",),
                    "ffn_in": ("mlp.c_fc",), "ffn_out": ("mlp.c_proj",)},
            fused={"attn.c_attn": 3},
            layer_list="h",
            ffn_width_key="n_inner",
        ),
        Family(
            name="bert",
            model_types=("bert", "roberta", "xlm-roberta", "electra", "camembert"),
            groups={"embedding": ("embeddings.word_embeddings",),
                    "attention": ("attention.self.query", "attention.self.key", "attention.self.value"),
                    "attention_output": ("attention.output.dense",),
                    "ffn_in": ("intermediate.dense",),
                    # not attention.output.dense: the FFN output is the layer's own `output.dense`
                    "ffn_out": (r"re:(.*\.)?layer\.\d+\.output\.dense",)},
            fused={},
            layer_list="encoder.layer",
        ),
        Family(
            name="llama",
            model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2"),
            groups={"embedding": ("embed_tokens",),
                    "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    "attention_output": ("self_attn.o_proj",),
                    "ffn_in": ("mlp.gate_proj", "mlp.up_proj"), "ffn_out": ("mlp.down_proj",)},
            fused={},
            layer_list="layers",
            head_keys=("num_attention_heads", "num_key_value_heads", "head_dim"),
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
    """The family of a model type; for an unknown type, the family whose group selectors match the most of the
    module `names` (a renamed or custom architecture with the usual layout), or None."""
    fam = family_of_model_type(model_type)
    if fam is not None or not names:
        return fam
    best, hits = None, 0
    for f in FAMILIES.values():
        n = sum(1 for name in names if f.group_of(name) is not None)
        if n > hits:
            best, hits = f, n
    return best


def known_model_types() -> list[str]:
    return [t for f in FAMILIES.values() for t in f.model_types]


# ----------------------------------------------------------------------------------------------- size axes


@dataclass(frozen=True)
class SizeAxis:
    """A size a plan has before any training, computed from its specs: one row of the table below, which budgets,
    the search's size strata, its prior and seeds, the knapsack, analysis and the CLI all read.

    name: the result column (trial summaries, tables) and the key of every cost dict (`{axis: value}`).
    objective: its name in `search.objectives`. label: axis and plot label. words: in a sentence ("the plan with
    the fewest {words}"). short: in report text and table headers. budget_key: its limit in a search's `space.budget`. spellings: the AXIS of a budget
    `AXIS=VALUE` (`plan --auto --budget`, seed targets), first the canonical one. totals_key: the model's total in a
    sensitivity profile's `model` header (and `search.model_info.ModelInfo`'s attribute).
    """

    name: str
    objective: str
    label: str
    words: str
    budget_key: str
    spellings: tuple[str, ...]
    totals_key: str
    short: str  # in report text and table headers ("MACs/token")


AXES: dict[str, SizeAxis] = {
    a.name: a for a in (
        SizeAxis("params", "params", "parameters", "parameters", "max_params", ("params",), "params", "params"),
        SizeAxis("params_excl_output_embedding", "params_excl_output_embedding", "parameters (excl. output embedding)",
                 "parameters excluding the output embedding", "max_params_excl_output_embedding",
                 ("params_excl", "params_excl_output_embedding"), "params_excl_output_embedding",
                 "params excl. output embedding"),
        SizeAxis("macs_per_token", "macs", "MACs per token", "multiply-adds", "max_macs", ("macs", "macs_per_token"),
                 "macs", "MACs/token"),
        # weight storage: each tensor's elements x its stored width (float32 4; int8 1 and int4 ½, plus float32
        # scales)
        SizeAxis("bytes", "bytes", "weight storage (bytes)", "bytes of weight storage", "max_bytes", ("bytes",),
                 "bytes", "bytes"),
    )
}
# Result columns a Pareto front may use as its size axis (known before training, so comparable across searches).
SIZE_AXES = tuple(AXES)
# `ratio=R` is a budget on the parameters excluding the output embedding: at most the teacher's / R (the papers'
# compression ratio, `compression_ratio` in results)
RATIO = "ratio"
RATIO_AXIS = "params_excl_output_embedding"


def size_axis(name: str) -> SizeAxis:
    """The axis of a result column, objective name or budget spelling ("macs", "macs_per_token" -> macs_per_token);
    KeyError for anything else."""
    for a in AXES.values():
        if name == a.name or name == a.objective or name in a.spellings:
            return a
    raise KeyError(name)


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
        *(Objective(a.objective, a.name, "min", a.label, True) for a in AXES.values()),
        Objective("latency", "latency_us_per_token", "min", "latency (µs per token)", False),
    )
}
SIZE_OBJECTIVES = tuple(k for k in OBJECTIVES if k != "quality")


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
# The bundled teacher's release: 1 (40 minutes of training, under one epoch), 2 (retrained to convergence, its model
# card says how). Searches record it (`search.config.config_fingerprint`), so one started with another release is not
# resumed with this one: its trials would distil two different teachers into one front.
DEMO_TEACHER_RELEASE = 2
