"""Named compression plans: the papers' hand-picked configurations, a uniform compression factor, and the low-rank
baseline at a uniform parameter reduction.

`preset_plan(name, config)` turns a preset name and a transformers config into a `CompressionPlan` with concrete
shapes, checking that the preset fits the model's sizes before any model is touched.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

from .errors import PlanError
from .plan import CompressionPlan
from .vocab import FAMILIES, family_of_model_type, known_model_types

__all__ = ["PRESETS", "get_plan", "model_family", "preset_plan"]

PRESETS: dict[str, str] = {
    "kngpt2": "KnGPT2 (Table 1): GPT-2 wte f=2; odd layers h.1, h.3, ...: Q, K, V, mlp.c_fc, mlp.c_proj at ~2x",
    "kroneckerbert8": "KroneckerBERT8: BERT-base, attention Q,K,V,O A 384x384, FFN A 8x2, word embedding f=8 (7.5x)",
    "kroneckerbert21": "KroneckerBERT21: BERT-base, attention A 384x48, FFN A 16x2, word embedding f=16 (20.9x)",
    "kroneckerbert5": "KroneckerBERT5: BERT-base, attention A 384x384, FFN A 384x384 at rank 4, embedding f=12 (4.5x)",
    "uniform:<factor>": "every attention and FFN matrix of every layer at the valid shape nearest to <factor>x "
                        "(GPT-2, BERT, Llama-family incl. grouped-query attention)",
    "lowrank:<factor>": "baseline: every attention and FFN matrix of every layer as a low-rank U·V holding 1/<factor> "
                        "of its parameters (truncated SVD; GPT-2's Q, K, V each their own)",
    "prune:<factor>": "structured pruning: every layer keeps 1/<factor> of its attention heads (key/value groups) and "
                      "FFN neurons, so its attention and FFN matrices hold <factor>x fewer parameters",
}

# KroneckerBERT, Table 1, given there as (n1, m1) of A; the second FFN matrix takes the swapped shape.
# KroneckerBERT5's "4 summed Kronecker products" go to the FFN: its A 384x384 / B 8x2 split compresses the FFN 16x at
# rank 1, so rank 4 brings it to 4x, level with the attention (A 384x384, B 2x2: 4x). Rank 4 on the attention
# matrices would leave them uncompressed (4·(384² + 4) ≈ 768²) and the model at ~2.4x, not ~5x.
_KRONECKERBERT = {
    "kroneckerbert8": {"attention": (384, 384), "ffn": (2, 8), "embedding": 8, "attention_rank": 1, "ffn_rank": 1},
    "kroneckerbert21": {"attention": (48, 384), "ffn": (2, 16), "embedding": 16, "attention_rank": 1, "ffn_rank": 1},
    "kroneckerbert5": {"attention": (384, 384), "ffn": (384, 384), "embedding": 12, "attention_rank": 1,
                       "ffn_rank": 4},
}

def model_family(config) -> str:
    """"gpt2", "bert" or "llama" (kron.vocab.FAMILIES) from config.model_type; PlanError for other models."""
    model_type = getattr(config, "model_type", None)
    family = family_of_model_type(model_type)
    if family is not None:
        return family.name
    supported = ", ".join(known_model_types())
    raise PlanError(f"presets know model types {supported}; this model's model_type is {model_type!r}. "
                    "Write a plan file with explicit rules for it")


def _config_of(obj):
    return getattr(obj, "config", obj) if hasattr(obj, "named_modules") else obj


def preset_plan(name: str, config) -> CompressionPlan:
    """A CompressionPlan for a preset (see PRESETS) and a transformers config (or a model, whose config is used).

    kngpt2 follows the KnGPT2 paper's Table 1 exactly: the input embedding A (v x d/2) ⊗ B (1 x 2); in the odd
    layers (zero-based: h.1, h.3, ...) Q, K and V each A (d/2 x d) ⊗ B (2 x 1) (c_attn factored as 3 blocks), mlp.c_fc
    A (4d/2 x d) ⊗ B (2 x 1) and mlp.c_proj the transposed shape A (d x 4d/2) ⊗ B (1 x 2); the attention output
    projection attn.c_proj and the even layers stay dense. For GPT-2 small this gives 85,676,990 parameters
    excluding the output embedding (the dense, untied LM head), against the paper's reported 83M; also compressing
    attn.c_proj the same way gives 83,907,530 (add a rule `{select: attn.c_proj, layers: odd, shape: [384, 768, 2,
    1]}`). Both figures are computed in tests/kron/test_presets.py.

    kroneckerbert8/21/5 use the absolute shapes of the KroneckerBERT paper (for BERT-base: hidden 768, FFN 3072) on
    every layer: attention Q, K, V, O; FFN intermediate; FFN output with the swapped shape; word embedding f.
    BertModel (109,482,240 parameters) becomes 14,654,216 / 5,228,272 / 24,295,500 parameters: 7.47x / 20.9x /
    4.51x (7.74x / 23.5x / 4.59x leaving out the dense pooler).

    uniform:<factor> gives every attention and FFN matrix the valid shape nearest to <factor>x compression (per
    matrix, so grouped-query k/v projections get their own shape); embeddings and heads stay dense.

    lowrank:<factor> selects the same matrices as uniform:<factor> but replaces each m x n one by U (m x r) · V (r x n)
    with r = max(1, floor(m·n / (factor·(m + n)))): the low-rank baseline at the same parameter reduction.

    prune:<factor> selects the same matrices and removes 1 - 1/factor of each layer's attention heads (key/value
    groups under grouped-query attention) and FFN neurons (`kron.methods.prune`), to the nearest whole unit.
    """
    config = _config_of(config)
    if not isinstance(name, str):
        raise PlanError(f"a preset name is a string, got {name!r}")
    if name.startswith("uniform:") or name == "uniform":
        return _uniform(name, config)
    if name.startswith("lowrank:") or name == "lowrank":
        return _lowrank(name, config)
    if name.startswith("prune:") or name == "prune":
        return _prune(name, config)
    if name == "kngpt2":
        return _kngpt2(config)
    if name in _KRONECKERBERT:
        return _kroneckerbert(name, config)
    raise PlanError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")


def get_plan(spec, config=None) -> CompressionPlan:
    """A CompressionPlan from a CompressionPlan, a plan dict, a .yaml/.json file path, or a preset name."""
    if isinstance(spec, CompressionPlan):
        return spec
    if isinstance(spec, Mapping):
        return CompressionPlan.from_dict(spec)
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        path = Path(text).expanduser()
        if path.is_file():
            return CompressionPlan.load(path)
        if text in PRESETS or text.startswith(("uniform:", "lowrank:", "prune:")) or text in ("uniform", "lowrank",
                                                                                             "prune"):
            if config is None:
                raise PlanError(f"preset {text!r} needs the model's config to pick shapes")
            return preset_plan(text, config)
        if path.suffix.lower() in (".yaml", ".yml", ".json") or os.sep in text:
            raise PlanError(f"plan file {text} does not exist")
        raise PlanError(f"{text!r} is neither a plan file nor a preset; presets: {', '.join(PRESETS)}")
    raise PlanError(f"a plan is a CompressionPlan, a dict, a file path or a preset name; got {type(spec).__name__}")


# ----------------------------------------------------------------------------------------------- presets


def _require_family(preset: str, config, family: str) -> None:
    got = model_family_or_none(config)
    if got != family:
        what = {"gpt2": "GPT-2 (model_type 'gpt2')", "bert": "BERT (model_type 'bert' or 'roberta')"}[family]
        others = {"gpt2": "kngpt2", "bert": "kroneckerbert8, kroneckerbert21, kroneckerbert5", "llama": None}
        alt = others.get(got)
        alt = f"presets for this model: {alt + ', ' if alt else ''}uniform:<factor>"
        raise PlanError(f"preset {preset!r} is for {what} models, but this model's model_type is "
                        f"{getattr(config, 'model_type', None)!r}; {alt}")


def model_family_or_none(config) -> str | None:
    try:
        return model_family(config)
    except PlanError:
        return None


def _kngpt2(config) -> CompressionPlan:
    _require_family("kngpt2", config, "gpt2")
    d, vocab, n_layer = config.n_embd, config.vocab_size, config.n_layer
    inner = config.n_inner if getattr(config, "n_inner", None) is not None else 4 * d
    fails = []
    if d % 2:
        fails.append(f"transformer.wte ({vocab} x {d}) needs an even n_embd for B 1x2, and Q/K/V ({d} x {d}) "
                     f"for A {d}/2 x {d} ⊗ B 2x1")
    if inner % 2:
        fails.append(f"mlp.c_fc ({inner} x {d}) needs an even FFN size for A {inner}/2 x {d} ⊗ B 2x1")
    if n_layer < 2:
        fails.append(f"the model has {n_layer} layer(s), so no odd-indexed layer (h.1, h.3, ...) to compress")
    if fails:
        raise PlanError("preset 'kngpt2' does not fit this GPT-2: " + "; ".join(fails))
    return CompressionPlan(
        [
            {"select": "wte", "embedding_factor": 2},
            {"select": "attn.c_attn", "layers": "odd", "shape": [d // 2, d, 2, 1], "blocks": 3},
            {"select": "mlp.c_fc", "layers": "odd", "shape": [inner // 2, d, 2, 1]},
            {"select": "mlp.c_proj", "layers": "odd", "shape": [d, inner // 2, 1, 2]},
        ],
        name="kngpt2",
        description=PRESETS["kngpt2"],
    )


def _kroneckerbert(name: str, config) -> CompressionPlan:
    _require_family(name, config, "bert")
    bert = FAMILIES["bert"]
    p = _KRONECKERBERT[name]
    d, inner, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    (an1, am1), (fn1, fm1) = p["attention"], p["ffn"]
    f = p["embedding"]
    base = "the KroneckerBERT shapes are for BERT-base (hidden 768, intermediate 3072); use uniform:<factor> for " \
           "other sizes"

    def check(what: str, m: int, n: int, m1: int, n1: int, rank: int) -> list[int]:
        if m % m1 or n % n1:
            raise PlanError(f"preset {name!r} does not fit this model: {what} weights are {m} x {n} (out x in) and "
                            f"the preset's A {m1}x{n1} (Table 1: (n1, m1) = ({n1}, {m1})) does not divide them; "
                            f"{base}")
        m2, n2 = m // m1, n // n1
        if m2 * n2 == 1 or m1 * n1 == 1:
            raise PlanError(f"preset {name!r} does not fit this model: {what} weights are {m} x {n} (out x in), so "
                            f"the preset's A {m1}x{n1} leaves B {m2}x{n2}: a 1x1 factor, no compression; {base}")
        if rank > min(m1 * n1, m2 * n2):
            raise PlanError(f"preset {name!r} does not fit this model: rank {rank} exceeds what A {m1}x{n1} ⊗ "
                            f"B {m2}x{n2} can hold for the {what} weights ({m} x {n}); {base}")
        return [m1, n1, m2, n2]

    attn = check("attention Q, K, V, O", d, d, am1, an1, p["attention_rank"])
    ffn_in = check("FFN intermediate.dense", inner, d, fm1, fn1, p["ffn_rank"])
    m1, n1, m2, n2 = ffn_in
    ffn_out = [n1, m1, n2, m2]  # the swapped shape for the (d x inner) output matrix
    if d % f:
        raise PlanError(f"preset {name!r} does not fit this model: word embeddings ({vocab} x {d}) cannot take "
                        f"embedding factor f={f}, which must divide the hidden size {d}; {base}")

    def rule(select, shape, rank):
        r: dict[str, Any] = {"select": select, "shape": shape}
        if rank != 1:
            r["rank"] = rank
        return r

    return CompressionPlan(
        [
            {"select": bert.embedding_selector, "embedding_factor": f},
            rule(list(bert.attention_selectors), attn, p["attention_rank"]),
            rule(bert.ffn_in_selectors[0], ffn_in, p["ffn_rank"]),
            rule(bert.ffn_out_selectors[0], ffn_out, p["ffn_rank"]),
        ],
        name=name,
        description=PRESETS[name],
    )


def _preset_factor(name: str, prefix: str, minimum: str) -> float | int:
    text = name.partition(":")[2]
    try:
        factor = float(text)
    except ValueError:
        factor = float("nan")
    ok = factor >= 1 if minimum == ">= 1" else factor > 1
    if not math.isfinite(factor) or not ok:
        raise PlanError(f"preset {name!r}: give a compression factor {minimum} after '{prefix}:', e.g. {prefix}:4")
    return int(factor) if factor.is_integer() else factor


def _matrix_rules(config, key: str, value) -> list[dict]:
    """Rules giving `key: value` to every attention and FFN matrix of the model's family (GPT-2's fused c_attn as
    3 blocks: Q, K, V)."""
    family = FAMILIES[model_family(config)]
    fused = [{"select": sel, key: value, "blocks": blocks} for sel, blocks in family.fused.items()]
    others = [sel for sel in family.linear_selectors if sel not in family.fused]
    return fused + [{"select": others if len(others) > 1 else others[0], key: value}]


def _uniform(name: str, config) -> CompressionPlan:
    factor_out = _preset_factor(name, "uniform", ">= 1")
    return CompressionPlan(_matrix_rules(config, "factor", factor_out), name=f"uniform:{factor_out}",
                           description=f"every attention and FFN matrix at the valid shape nearest to {factor_out}x")


def _lowrank(name: str, config) -> CompressionPlan:
    # at a reduction of 1, U·V would be as large as W itself: no compression to compare against
    factor_out = _preset_factor(name, "lowrank", "> 1")
    return CompressionPlan(_matrix_rules(config, "lowrank_ratio", factor_out), name=f"lowrank:{factor_out}",
                           description=f"every attention and FFN matrix as a low-rank U·V with 1/{factor_out} of its "
                                       "parameters")


def _prune(name: str, config) -> CompressionPlan:
    # removing 1 - 1/f of the heads and neurons shrinks Q, K, V, O and the FFN matrices f-fold (per layer, to the
    # nearest whole head / neuron); f = 1 removes nothing
    factor_out = _preset_factor(name, "prune", ">= 1")
    fraction = 1 - 1 / factor_out
    family = FAMILIES[model_family(config)]
    from .methods.prune import removed_units
    from .methods.prune.structure import head_layout

    heads, kv, _ = head_layout(config)
    d = config.hidden_size
    ffn = getattr(config, "n_inner", None) or getattr(config, "intermediate_size", None) or 4 * d
    for units, what in ((kv, "attention heads" if kv == heads else "key/value groups"), (ffn, "FFN neurons")):
        if removed_units(fraction, units) >= units:
            raise PlanError(f"preset {name!r} does not fit this model: each layer has {units} {what}, and keeping "
                            f"1/{factor_out} of them leaves none (factors below {2 * units} keep at least one)")
    return CompressionPlan([{"select": list(family.linear_selectors), "prune": {"heads": fraction, "ffn": fraction}}],
                           name=f"prune:{factor_out}",
                           description=f"every layer keeps 1/{factor_out} of its attention heads and FFN neurons")
