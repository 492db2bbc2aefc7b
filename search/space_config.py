"""The `space:` section of a search config: which matrices may be compressed, by which methods (each with its own
options, validated by the method itself: `kron.methods.Method.options_type`), over which layers, within which
budget.

    space:
      groups: [attention, attention_output, ffn_in, ffn_out]
      layers: free
      methods:                       # or a list: [kronecker, lowrank, int8] (each with its defaults)
        kronecker: {ranks: [1, 2], max_aspect: 16}
        lowrank: {}
        prune: {fractions: [0.25, 0.5]}
        quant: {bits: [8, 4]}        # a modifier: every structure also stored in 8 and 4 bits
      min_compression: 2             # the span every method's candidates share
      max_shapes: 6
      budget: {max_params: 3.5e6}

Earlier releases spelled some options at the top of the section (`ranks`, `max_aspect`, `prune_fractions`,
`embedding_factors`, `quantize`); those spellings are still read, into the methods' sections, and never written
back, so a saved config and its resume fingerprint normalise to the same sections (`search.resume`).
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_serializer, field_validator, model_validator

from kron.methods.base import MethodOptions, Span
from kron.vocab import AXES, GROUPS

__all__ = ["DEFAULT_SPACE_METHODS", "LEGACY_KEYS", "BudgetConfig", "LayerCount", "PriorConfig", "SpaceConfig",
           "Strict"]

# The default methods of this release: every linear matrix may be Kronecker or low-rank (searches started by 0.1.0
# ran with [kronecker]: `search.resume.adopt_saved_defaults`).
DEFAULT_SPACE_METHODS = ("kronecker", "lowrank")
# earlier releases' spellings of method options at the top of the space section: key -> (method, option)
LEGACY_KEYS = {"ranks": ("kronecker", "ranks"), "max_aspect": ("kronecker", "max_aspect"),
               "prune_fractions": ("prune", "fractions"), "embedding_factors": ("kron_embedding", "factors")}
_QUANTIZE = ("none", "int8", "int4")  # the earlier `quantize: [none, int8]` list, int4 included


class Strict(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True,
                              allow_inf_nan=False)  # lr: .inf passed every check, then every trial diverged


class LayerCount(Strict):
    """Exactly `count` of the model's layers are decomposed; the search picks which."""

    count: int = Field(ge=0)


class _BudgetBase(Strict):
    """Hard limits: a sampled plan over any of them is rejected and resampled, never trained. One optional limit
    per size axis of `kron.vocab.AXES` (its `budget_key`); `to_budget()` is the `kron.budget.Budget` they make."""

    @field_validator(*(a.budget_key for a in AXES.values()), mode="before", check_fields=False)
    @classmethod
    def _numbers(cls, v):
        # YAML reads 2e6 as a float (or even a string "2e6" in YAML 1.1); accept whole numbers in any spelling
        if isinstance(v, str):
            try:
                v = float(v.replace("_", ""))
            except ValueError:
                return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return v

    @model_validator(mode="after")
    def _some_limit(self):
        keys = [a.budget_key for a in AXES.values()]
        if all(getattr(self, k) is None for k in keys):
            raise ValueError(f"a budget needs {', '.join(keys[:-1])} and/or {keys[-1]} (or remove `budget`)")
        return self

    def to_budget(self):
        """The `kron.budget.Budget` of these limits."""
        from kron.budget import Budget

        return Budget.from_config(self.model_dump())


BudgetConfig = create_model(
    "BudgetConfig", __base__=_BudgetBase, __module__=__name__,
    **{a.budget_key: (int | None, Field(None, ge=1, description=f"at most this many {a.words} after compression"))
       for a in AXES.values()})


class PriorConfig(Strict):
    """A prior from the sensitivity profile: per matrix, the damage (relative output error on calibration tokens
    with data-aware init, `kron.profile`) of each candidate alone; candidates above `max_damage` are not sampled."""

    max_damage: float = Field(0.5, gt=0, description="largest relative output error a candidate may have on any "
                                                     "matrix of its choice (the least damaging candidate of each "
                                                     "choice always stays)")
    calib_tokens: int | None = Field(None, ge=256, description="calibration tokens (default: the trial's "
                                                               "init.calib_tokens)")


def _registry():
    from kron.methods import LINEAR_KINDS, all_methods, get_method

    return LINEAR_KINDS, all_methods, get_method


class SpaceConfig(Strict):
    """Which matrices may be compressed, by which methods, and the choices for each."""

    groups: list[Literal[GROUPS]] = Field(
        default_factory=lambda: ["attention", "attention_output", "ffn_in", "ffn_out"],
        description="standard matrix groups, mapped to module names per architecture (GPT-2, BERT, Llama)")
    modules: dict[str, list[str]] | None = Field(
        None, description="extra groups given by module selectors (exact / glob / 're:' regex): name -> selectors")
    tie_layers: bool = Field(False, description="one shape choice per group shared by all layers")
    layers: Literal["all", "free", "odd", "even"] | list[int] | LayerCount = Field(
        "all", description="which layers are decomposed: all, free (searched per layer), odd, even (0-based "
                           "indices), a list of indices, or {count: k} (exactly k layers, searched)")
    methods: dict[str, Any] = Field(
        default_factory=lambda: {m: {} for m in DEFAULT_SPACE_METHODS}, validate_default=True,
        description="the compression methods a matrix may take, each with its own options (kron.methods: "
                    "kronecker, lowrank, prune, quant / int8 / int4, kron_embedding for the embedding group): a list "
                    "of names, or name -> options; with several structures the search picks one per matrix (prune: "
                    "per layer's attention or FFN block), a modifier (quant) offers each structure in its variants")
    min_compression: float = Field(2.0, ge=1, description="smallest dense/compressed parameter ratio per matrix")
    max_compression: float | None = Field(None, ge=1)
    max_shapes: int | None = Field(None, ge=1, description="keep at most this many candidates per method and matrix, "
                                                           "evenly spread over log-compression (None: all)")
    prior: PriorConfig | None = Field(None, description="drop the candidates a sensitivity profile of the teacher "
                                                        "(computed before Ray starts) says are hopeless")
    allow_keep: bool = Field(False, description="add 'keep' (stay dense) to every matrix's choices")
    shapes: dict[str, list[str]] | None = Field(
        None, description="explicit choices per group, e.g. {ffn_in: ['16x8,64x32,r1', keep]} (overrides the "
                          "ranges above for that group)")
    budget: BudgetConfig | None = None
    # earlier spellings (LEGACY_KEYS, quantize): read into `methods`, never written
    ranks: Any = Field(None, exclude=True)
    max_aspect: Any = Field(None, exclude=True)
    prune_fractions: Any = Field(None, exclude=True)
    embedding_factors: Any = Field(None, exclude=True)
    quantize: Any = Field(None, exclude=True)

    # ------------------------------------------------------------------------------------------- methods

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, v):
        linear, all_methods, get_method = _registry()
        structures = [m.name for m in all_methods() if set(m.module_kinds) & set(linear) and not m.modifier]
        # listed in the order a user picks them: linear structures, modifiers (and their aliases), embeddings
        valid = structures + [n for m in all_methods() if m.modifier for n in (m.name, *m.aliases)] + \
            [m.name for m in all_methods() if "embedding" in m.module_kinds and not m.modifier]
        if isinstance(v, (list, tuple)):
            v = {name: {} for name in v} if all(isinstance(x, str) for x in v) else v
        if not isinstance(v, dict):
            raise ValueError(f"methods must be a list of method names or a mapping name -> options; valid names: "
                             f"{', '.join(valid)}")
        unknown = [m for m in v if m not in valid]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; valid: {', '.join(valid)}")
        out: dict[str, Any] = {}
        for name, given in v.items():
            method = get_method(name)
            if isinstance(given, MethodOptions):
                opts = given
            else:
                if given is not None and not isinstance(given, dict):
                    raise ValueError(f"methods.{name}: options are a mapping (or null for the defaults), got "
                                     f"{given!r}")
                opts = method.options(given, alias=name if name != method.name else None)
            if method.name in out:  # int8 and int4 both listed: one quantisation with both widths
                opts = _merged(method, out[method.name], opts)
            out[method.name] = opts
        if not any(n in structures for n in out):
            raise ValueError(f"methods must list at least one of {', '.join(structures)}")
        for m in all_methods():  # the embedding group's methods always have their options
            if "embedding" in m.module_kinds and m.name not in out:
                out[m.name] = m.options()
        return out

    @field_serializer("methods")
    def _dump_methods(self, methods: dict) -> dict:
        return {k: v.model_dump(mode="json") if isinstance(v, MethodOptions) else v for k, v in methods.items()}

    @field_validator("quantize")
    @classmethod
    def _quantize(cls, v):
        if v is None:
            return v
        if not isinstance(v, list) or not v or len(set(v)) != len(v) or any(x not in _QUANTIZE for x in v):
            raise ValueError(f"quantize must list none, int8 and/or int4, each once, got {v}")
        return v

    @field_validator(*LEGACY_KEYS)
    @classmethod
    def _legacy(cls, v, info):
        if v is None and info.field_name != "max_aspect":
            return v
        method, option = LEGACY_KEYS[info.field_name]
        from pydantic import ValidationError

        try:
            return getattr(_registry()[2](method).options_type.model_validate({option: v}), option)
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None

    @model_validator(mode="after")
    def _read_legacy(self):
        given = self.model_fields_set
        methods = dict(self.methods)
        _, _, get_method = _registry()
        updates: dict[str, dict] = {}
        for key, (name, option) in LEGACY_KEYS.items():
            if key not in given or name not in methods:
                continue
            if option in methods[name].model_fields_set:
                raise ValueError(f"{key} and methods.{name}.{option} both given: keep one (methods.{name}.{option})")
            updates.setdefault(name, {})[option] = getattr(self, key)
        for name, update in updates.items():
            opts = methods[name]
            methods[name] = type(opts).model_validate({**opts.model_dump(exclude_unset=True), **update})
        if "quantize" in given and self.quantize is not None and [q for q in self.quantize if q != "none"]:
            quant = get_method("int8")
            if quant.name in methods:
                raise ValueError(f"quantize and methods.{quant.name} both given: keep one (methods.{quant.name})")
            bits = [quant.alias_options(q)["bits"][0] for q in self.quantize if q != "none"]
            methods[quant.name] = quant.options({"bits": bits, "keep_float": "none" in self.quantize})
        if methods != self.methods:
            object.__setattr__(self, "methods", methods)
        return self

    # ------------------------------------------------------------------------------------------- the rest

    @field_validator("groups")
    @classmethod
    def _unique_groups(cls, v: list[str]) -> list[str]:
        dup = sorted({g for g in v if v.count(g) > 1})
        if dup:
            raise ValueError(f"groups listed twice: {dup}")
        return v

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v):
        valid = ("layers must be 'all', 'free' (searched per layer), 'odd', 'even' (0-based indices), a list of "
                 "0-based layer indices, or {count: k} (exactly k layers, searched)")
        if isinstance(v, str) and v not in ("all", "free", "odd", "even"):
            raise ValueError(valid)
        if isinstance(v, dict):
            k = v.get("count")
            if set(v) != {"count"} or isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ValueError(valid + "; count is a non-negative integer")
            return LayerCount(count=k)
        if not isinstance(v, (str, list, dict, LayerCount)):
            raise ValueError(valid)
        if isinstance(v, list):
            bad = [x for x in v if isinstance(x, bool) or not isinstance(x, int) or x < 0]
            if bad or not v:
                raise ValueError(f"a layer list holds 0-based layer indices (non-negative integers), got {v!r}")
            return sorted(set(v))
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_compression is not None and self.max_compression < self.min_compression:
            raise ValueError(f"max_compression {self.max_compression} is below min_compression "
                             f"{self.min_compression}")
        custom = self.modules or {}
        clash = sorted(set(custom) & set(GROUPS))
        if clash:
            raise ValueError(f"modules: group names {clash} are standard groups; pick other names (standard "
                             f"groups go in `groups`)")
        for name, sels in custom.items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
                raise ValueError(f"modules: group name {name!r} must be an identifier (letters, digits, _)")
            if not sels:
                raise ValueError(f"modules.{name}: give at least one module selector")
        if not self.groups and not custom:
            raise ValueError("the space is empty: list `groups` and/or `modules`")
        known = set(self.groups) | set(custom)
        for g in self.shapes or {}:
            if g not in known:
                raise ValueError(f"shapes: {g!r} is not a searched group; searched groups: {sorted(known)}")
        return self

    # ------------------------------------------------------------------------------------------- reading it

    @property
    def span(self) -> Span:
        """The compression span every method's candidates share."""
        return Span(self.min_compression, self.max_compression, self.max_shapes)

    def method_options(self, name: str) -> MethodOptions:
        """A method's options in this space (its defaults where the space does not list it)."""
        method = _registry()[2](name)
        return self.methods.get(method.name) or method.options()

    def method_names(self) -> list[str]:
        """The listed methods as a user lists them: every one but the embedding group's (always present)."""
        _, _, get_method = _registry()
        return [n for n in self.methods if set(get_method(n).module_kinds) - {"embedding"}]

    def structure_methods(self, kind: str = "linear") -> list[str]:
        """The per-matrix structures a matrix of `kind` ("linear" or "embedding") may take: listed methods for a
        linear one (modifiers and per-block methods left out), the embedding methods for an embedding."""
        linear, _, get_method = _registry()
        kinds = linear if kind != "embedding" else ("embedding",)
        return [n for n in self.methods if set(get_method(n).module_kinds) & set(kinds)
                and not get_method(n).modifier and not get_method(n).block_parts]

    def modifier_methods(self) -> list[str]:
        _, _, get_method = _registry()
        return [n for n in self.methods if get_method(n).modifier]

    def block_methods(self) -> list[str]:
        """Listed methods chosen per block of matrices (prune), not per matrix."""
        _, _, get_method = _registry()
        return [n for n in self.methods if get_method(n).block_parts]


def _merged(method, a: MethodOptions, b: MethodOptions) -> MethodOptions:
    """One method listed twice by aliases (int8, int4): list fields joined, the rest from the later."""
    data = b.model_dump()
    for k, v in a.model_dump().items():
        if isinstance(v, list) and isinstance(data.get(k), list):
            data[k] = [*v, *(x for x in data[k] if x not in v)]
    return method.options(data)
