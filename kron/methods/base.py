"""What every compression method provides, and the registry that maps names, plan keys, spec dicts and modules to
methods. Torch-free: the search space's cost model and `analysis` use specs and labels without loading torch;
a method's layers (in its `layer` module) are imported only when a model is built.

A method is one `Method` object plus one `ModuleSpec` subclass, registered with `register`:

* the typed spec: `to_dict` / `from_dict` (the dict written in plan files, kronsearch.json and trial summaries),
  `params(m, n)` and `macs(m, n)` for an m x n weight (out x in; vocab x dim for embeddings), `describe`, a short
  `label` (tables and plots) and the `option` string a search samples;
* the plan-rule keys it owns (`primary_keys` pick the method, `option_keys` refine it) and how a rule becomes a spec
  for one concrete module (`spec_for`);
* `candidates(m, n, constraints)`: the specs it offers for a matrix in a search;
* `build(module, spec, init, stats=None)`: the replacement module, from the dense one ("svd": data-free init;
  "data": data-aware init from `stats`, the module's calibration statistics (`kron.calibration.ModuleStats`), for
  methods with `data_init = True`; "none": structure only, for loading saved weights), and `recognise(module)`:
  the spec of a module it built (reloading, merging). A method without a data-aware init (`data_init = False`,
  the default) is built with "svd" when "data" is asked for, and the compression report says so.

A *modifier* (`Method.modifier = True`; the int8 quantisation of `kron.methods.quant`) is not a structure of its
own but wraps any structure's spec: its rule keys (e.g. `quantize: int8`) go beside one primary key of a structure
(`shape:`, `lowrank_ratio:`, ...) or alone (the dense matrix), and `modify(inner, options, slot)` wraps the inner
spec (None for the dense matrix). Its spec dicts carry its `dict_key` beside the inner spec's keys. A modifier's spec
and layer hold the structure's as `inner`; the block-wide steps of a structured method (`check_resolved`, `prepare`,
`finish`, `merge_config`: pruning's) are the structure's, so surgery and plans hand them the inner spec
(`structure_of`) and the wrapped layer (`structure_layer`), whether or not a modifier wraps it.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from ..errors import PlanError

__all__ = [
    "LINEAR_KINDS",
    "Method",
    "MethodOptions",
    "ModuleSpec",
    "Slot",
    "Span",
    "all_methods",
    "check_keys",
    "family_of",
    "get_method",
    "method_of_key",
    "method_of_module",
    "parse_label",
    "parse_option",
    "positive_int",
    "register",
    "rule_keys",
    "spec_from_dict",
    "structure_layer",
    "structure_of",
    "unregister",
    "with_structure",
]

LINEAR_KINDS = ("linear", "conv1d")  # kron.plan.module_type of nn.Linear and transformers' Conv1D


@dataclass(frozen=True)
class Slot:
    """The module a plan rule is being resolved for: its dotted name, kind ("linear", "conv1d", "embedding"), class
    name and dense size (out x in; vocab x dim for embeddings), and the rule's position for error messages.
    split: which side a method that picks shapes by compression factor prefers to split among equally compressing
    shapes ("output": the papers' tie-break; "input": what data-aware init serves best); None = "output".
    context: the method's `plan_context` of the module (structured methods), else None."""

    where: str
    name: str
    kind: str
    type_name: str
    m: int
    n: int
    split: str | None = None
    # what a structured method needs beyond the matrix size (`Method.plan_context`: for `prune`, the attention or FFN
    # block the matrix belongs to); None for methods that need nothing more
    context: Mapping | None = None


class _SpecMeta(type):
    """`ModuleSpec(shape=..., rank=..., blocks=..., embedding_factor=..., lowrank_rank=...)`, the constructor of
    the first release, still builds the right typed spec; subclasses construct normally."""

    def __call__(cls, *args, **kwargs):
        if cls is ModuleSpec:
            return _legacy_spec(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class ModuleSpec(metaclass=_SpecMeta):
    """How one module is compressed: the base of every method's typed spec (frozen dataclasses).

    `ModuleSpec.from_dict(d)` returns the spec of whichever method `d` belongs to.
    """

    method: ClassVar[str]
    version: ClassVar[int] = 1  # bump when the dict format changes; `from_dict` then migrates older versions

    @property
    def kind(self) -> str:
        """A coarse kind kept in compression reports: "linear", "fused", "embedding" or "lowrank"."""
        raise NotImplementedError

    def params(self, m: int, n: int) -> int:
        """Parameters of the factors (no bias) for an m x n weight."""
        raise NotImplementedError

    def macs(self, m: int, n: int) -> int:
        """Multiply-adds per token for an m x n weight (0 for embedding lookups)."""
        raise NotImplementedError

    def describe(self, m: int | None = None, n: int | None = None) -> str:
        """Human-readable factors, e.g. "A 384x768 ⊗ B 2x1"; concrete sizes need (m, n) for some methods."""
        raise NotImplementedError

    def label(self) -> str:
        """A short size-free label for tables and plots, parsed back by `parse_label`."""
        raise NotImplementedError

    def option(self) -> str:
        """The categorical value a search samples for this spec, parsed back by `parse_option`."""
        raise NotImplementedError

    def compression(self, m: int | None = None, n: int | None = None) -> float:
        """Dense / factored parameters; NaN where the size is needed but not given."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError

    def to_rule(self) -> dict:
        """The plan-rule keys that reproduce this spec (beside `select`)."""
        return self.to_dict()

    def check(self, slot: Slot) -> None:
        """Raise PlanError when this spec cannot be applied to the module in `slot`."""
        raise NotImplementedError

    def weight_shapes(self, m: int, n: int) -> list[tuple[int, ...]]:
        """The shapes of the layer's weight tensors (factors; no bias) for an m x n weight, the input side last:
        what a quantisation modifier stores, one scale per row (all leading axes). Methods that do not list them
        cannot be quantised."""
        raise NotImplementedError(f"{type(self).__name__} does not list its weight tensors")

    def bytes(self, m: int, n: int, width: int = 4) -> int:
        """Bytes of the stored weights (no bias) for an m x n weight whose floats take `width` bytes (float32: 4)."""
        return self.params(m, n) * width + self.aux_bytes(m, n)

    def aux_bytes(self, m: int, n: int) -> int:
        """Bytes the layer stores beside its weight tensors and bias, whatever the weights' width (a pruned layer's
        kept-unit indices); 0 for most methods. A quantisation modifier keeps them as they are."""
        return 0

    @classmethod
    def from_dict(cls, d: Mapping) -> "ModuleSpec":
        if cls is ModuleSpec:
            return spec_from_dict(d)
        return cls._from_dict(d)

    @classmethod
    def _from_dict(cls, d: Mapping) -> "ModuleSpec":
        raise NotImplementedError


class Method:
    """One compression method. Subclasses set the class attributes and implement the methods below.

    name: registry name ("kronecker", "lowrank", ...). spec_type: its ModuleSpec subclass.
    module_kinds: the dense module kinds it replaces (LINEAR_KINDS or ("embedding",)).
    primary_keys: plan-rule keys that select this method (a rule has exactly one primary key of one method).
    option_keys: further rule keys it takes, with their defaults (shared keys such as `blocks` may belong to
        several methods). alternative: None when the method is one of the rule's main choices; otherwise the
        phrase that introduces it in error messages ("a low-rank U·V instead of Kronecker factors").
    dict_key: the key whose presence identifies the method in a spec dict.
    """

    name: str
    spec_type: type
    module_kinds: tuple[str, ...] = LINEAR_KINDS
    primary_keys: tuple[str, ...] = ()
    option_keys: dict[str, Any] = {}
    alternative: str | None = None
    order: int = 100  # position in listings and error messages; the built-ins use 10, 20, 30
    dict_key: str
    rule_hint: str  # its rule keys as error messages name them, e.g. "shape or factor"
    data_init: bool = False  # build() takes init="data" with calibration `stats` (kron.datainit)
    modifier: bool = False  # wraps another method's spec (see the module docstring) instead of being a structure
    # further names `get_method` finds it by: the `spec.method` values of its specs when they are not `name` (a
    # modifier with a parameter: "int8" and "int4" are both the quantisation modifier's)
    aliases: tuple[str, ...] = ()
    # the family a trial whose plan uses only this structure belongs to (`family_of`): its name by default; the
    # Kronecker embedding's is kronecker (a plan of Kronecker factors and a Kronecker embedding is a Kronecker plan)
    family: str | None = None
    # a method chosen per block of matrices rather than per matrix (prune): part -> the search groups its blocks
    # span; such a method provides search_blocks, choosable_blocks, block_options, seed_block_option, part_words
    block_parts: dict[str, tuple[str, ...]] = {}

    # --- plan rules
    def validate_rule(self, options: dict, where: str) -> dict:
        """Check and normalise the rule keys this method owns; returns the normalised options."""
        return options

    def spec_for(self, options: Mapping, slot: Slot) -> ModuleSpec:
        """The concrete spec of a rule's options for one module (validated against its size)."""
        raise NotImplementedError

    def rule_to_dict(self, options: Mapping) -> dict:
        """The options as written back to a plan file (defaults left out)."""
        return {k: v for k, v in options.items() if self.option_keys.get(k, object()) != v}

    def modify(self, inner: ModuleSpec | None, options: Mapping, slot: Slot) -> ModuleSpec:
        """Modifiers only: the spec wrapping `inner` (a structure's spec for this module, None for the dense matrix)."""
        raise NotImplementedError

    # --- search and profile: what it offers for a matrix, and its own settings
    options_type: type = None  # its MethodOptions subclass (set below the class: MethodOptions is defined there)

    def options(self, given: Mapping | None = None, *, alias: str | None = None) -> "MethodOptions":
        """Its validated options: `given` (a section of `space.methods`, the profile's settings) over the defaults,
        and, when the method was named by an alias, what the alias means (`alias_options`). ConfigError naming
        the method and the key for an unknown key or a bad value."""
        from pydantic import ValidationError

        from ..errors import ConfigError

        data = {**self.alias_options(alias), **dict(given or {})}
        try:
            return self.options_type.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(options_error(self.name, exc)) from None

    def alias_options(self, alias: str | None) -> dict:
        """The options that listing the method by an alias implies (int4: {"bits": [4]}); {} by default."""
        return {}

    def candidates(self, m: int, n: int, options: "MethodOptions", span: "Span") -> list[ModuleSpec]:
        """The specs this method offers for an m x n block: its `options` (validated `options_type`) within the
        shared compression `span`, in increasing compression."""
        return []

    # modifiers only: the variants of a structure they make (a search offers each structure in each of them)
    def variants(self, inner: ModuleSpec | None, options: "MethodOptions") -> list[ModuleSpec]:
        """The modified specs of `inner` (a structure's spec; None: the dense matrix) that `options` ask for."""
        return []

    def keeps_unmodified(self, options: "MethodOptions") -> bool:
        """Whether a search offers the unmodified structures beside the variants (quantisation: float weights)."""
        return True

    def level_order(self, spec: ModuleSpec, m: int, n: int) -> tuple:
        """How a profile orders this method's equally compressing candidates of an m x n block when it keeps only
        the first few per compression level (`shapes_per_level`): the fewest multiply-adds first by default."""
        return (spec.macs(m, n), spec.label())

    # --- damage: closed-form output error on calibration statistics, where the method has one (`kron.damage`)
    def block_damage(self, block, spec: ModuleSpec) -> tuple[float, str] | None:
        """f = tr((W − Ŵ) S (W − Ŵ)ᵀ) of `spec` on one output block (`kron.damage.MatrixBlock`: W, S and the
        pieces several candidates share) with the method's data-aware init, and the init it stands for ("svd" or
        "data"); None where there is no closed form (the profile then builds the layer and measures it). Methods
        that keep the factors behind it put them in `block.cache` for `layer_from_factors`."""
        return None

    def modifier_damage(self, block, spec: ModuleSpec) -> float:
        """Modifiers only: f of the dense matrix of `block` modified as `spec` says (int8: rounded to 8 bits), which
        `kron.damage` adds to the damage of the structure the spec wraps."""
        raise NotImplementedError(f"{self.name} is not a modifier")

    def layer_from_factors(self, module, spec: ModuleSpec, blocks: Sequence) -> object | None:
        """The layer `build(module, spec, "data", stats)` would give, from the factors its `block_damage` left in
        each block's cache (one block per output block), without solving again; None when they are not there."""
        return None

    # --- modules (torch)
    def build(self, module, spec: ModuleSpec, init: str, stats=None):
        """The replacement of a dense module. init: "svd", "none", or (methods with `data_init`) "data" with
        `stats` the module's `kron.calibration.ModuleStats`. Methods without a data-aware init may leave `stats`
        out of their signature: they are only ever called with init "svd" or "none"."""
        raise NotImplementedError

    def layer_types(self) -> tuple[type, ...]:
        """The module classes this method puts in a model (imports its layers)."""
        raise NotImplementedError

    def recognise(self, module) -> ModuleSpec | None:
        """The spec of a module this method built, or None."""
        raise NotImplementedError

    # --- structured methods (several matrices changed together, e.g. `prune`); the defaults do nothing
    def plan_context(self, model, name: str, module) -> Mapping | None:
        """Facts about a module beyond its size that `spec_for` needs (given to it as `slot.context`), or None."""
        return None

    def check_resolved(self, specs: Mapping[str, ModuleSpec], model) -> None:
        """Raise PlanError when this method's specs (name -> spec, this method's only; a modifier's spec as the inner
        spec it wraps) do not fit together, e.g. a pruned attention block whose output projection is not pruned
        alike. Called before the model changes."""

    def prepare(self, model, specs: Mapping[str, ModuleSpec], init: str, calib=None) -> dict[str, dict]:
        """Decisions taken for several modules at once before any is built (which heads a pruned block keeps):
        name -> {"spec": the final spec (if it changes), and keyword arguments for `build`}."""
        return {}

    def finish(self, model, names: Sequence[str]) -> None:
        """Called once after this method's modules `names` are swapped in (e.g. fix an attention's head count)."""

    def merge_config(self, model) -> dict:
        """Config entries a merged (dense) model needs for `from_pretrained` to rebuild it (e.g. a pruned FFN's
        `intermediate_size`); PlanError when its config cannot describe it. Called before `merge` changes anything."""
        return {}

    # --- labels and options
    def parse_label(self, text: str) -> ModuleSpec | None:
        return None

    def parse_option(self, text: str) -> ModuleSpec | None:
        return None


class MethodOptions(BaseModel):
    """A method's own search settings: its section of a search's `space.methods` and of a profile's settings,
    validated by the method (unknown keys and bad values are errors naming them), its defaults in one place.
    Methods subclass it with their fields; a method without settings keeps this empty one."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Method.options_type = MethodOptions


@dataclass(frozen=True)
class Span:
    """The candidate range every method shares: per-matrix compression (dense / its parameters) in
    [min_compression, max_compression] and at most `max_shapes` candidates per method and matrix, spread evenly
    over log-compression (None: all)."""

    min_compression: float = 1.0
    max_compression: float | None = None
    max_shapes: int | None = None


def options_error(method: str, exc) -> str:
    """One line per problem of a method's options: "<method>.<key>: <problem> (got <value>)"."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p[:1].isupper())) or "(options)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            lines.append(f"{method}.{key}: unknown option of method {method}")
        else:
            got = repr(err.get("input"))
            lines.append(f"{method}.{key}: {msg} (got {got if len(got) < 80 else got[:77] + '...'})")
    return "; ".join(dict.fromkeys(lines))


_REGISTRY: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}  # alias -> registered name


def register(method: Method) -> Method:
    """Add a method to the registry (its name, keys and dict key must not clash with registered ones)."""
    names = (method.name, *method.aliases)
    for other in _REGISTRY.values():
        taken = set(names) & {other.name, *other.aliases}
        if taken:
            raise ValueError(f"a compression method named {sorted(taken)[0]!r} is already registered")
        clash = set(method.primary_keys) & set(other.primary_keys)
        if clash or method.dict_key == other.dict_key:
            raise ValueError(f"method {method.name!r} reuses the keys {sorted(clash) or [method.dict_key]} of "
                             f"{other.name!r}")
    _REGISTRY[method.name] = method
    for alias in method.aliases:
        _ALIASES[alias] = method.name
    return method


def all_methods() -> list[Method]:
    """Registered methods, main choices first, then the alternatives, then the modifiers, each in registration
    order."""
    methods = sorted(_REGISTRY.values(), key=lambda m: m.order)  # stable: equal orders keep registration order
    structures = [m for m in methods if not m.modifier]
    return ([m for m in structures if m.alternative is None] + [m for m in structures if m.alternative is not None]
            + [m for m in methods if m.modifier])


def modifiers() -> list[Method]:
    """The registered modifiers (methods that wrap a structure's spec, e.g. int8 quantisation)."""
    return [m for m in all_methods() if m.modifier]


def get_method(name: str) -> Method:
    """The registered method of a name or alias (the `method` of any spec it makes)."""
    try:
        return _REGISTRY[_ALIASES.get(name, name)]
    except (KeyError, TypeError):
        known = [n for m in all_methods() for n in (m.name, *m.aliases)]
        raise PlanError(f"unknown compression method {name!r}; known: {', '.join(known)}") from None


def modifier_keys() -> list[str]:
    return [k for m in modifiers() for k in m.primary_keys]


def method_of_key(key: str) -> Method | None:
    """The method a primary plan-rule key selects."""
    for m in _REGISTRY.values():
        if key in m.primary_keys:
            return m
    return None


def primary_keys() -> list[str]:
    """The keys that choose a structure (modifiers' keys are not among them: they go beside one of these)."""
    return [k for m in all_methods() if not m.modifier for k in m.primary_keys]


def option_defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in all_methods():
        for k, v in m.option_keys.items():
            out.setdefault(k, v)
    return out


def rule_keys() -> tuple[str, ...]:
    """Every key a plan rule may have, in the order error messages list them: selection keys, the main methods'
    keys, `keep`, then the alternative methods' keys."""
    keys = ["select", "layers"]
    for m in all_methods():
        if m.alternative is not None and "keep" not in keys:
            keys.append("keep")
        for k in (*m.primary_keys, *m.option_keys):
            if k not in keys:
                keys.append(k)
    if "keep" not in keys:
        keys.append("keep")
    return tuple(keys)


def choice_message() -> str:
    """ "exactly one of shape, factor, embedding_factor or keep: true" and the alternatives' clauses."""
    main = [k for m in all_methods() if m.alternative is None and not m.modifier for k in m.primary_keys]
    return f"give exactly one of {', '.join(main)} or keep: true"


def alternatives_message() -> str:
    parts = [f"; or, for {m.alternative}, one of {' or '.join(m.primary_keys)}"
             for m in all_methods() if m.alternative is not None and not m.modifier]
    parts += [f"; {m.rule_hint} may go beside any of them, or alone ({m.alternative or m.name} of the dense matrix)"
              for m in modifiers()]
    return "".join(parts)


def spec_from_dict(d: Mapping) -> ModuleSpec:
    """The typed spec of a spec dict (as written by `ModuleSpec.to_dict`), whichever method wrote it."""
    if not isinstance(d, Mapping):
        raise PlanError(f"a module spec is a mapping, got {type(d).__name__} {d!r}")
    if "method" in d:
        method = get_method(d["method"])
        return method.spec_type._from_dict({k: v for k, v in d.items() if k != "method"})
    for mod in modifiers():  # a modifier's key beside the inner spec's keys: the modifier parses both
        if d.get(mod.dict_key) is not None:
            return mod.spec_type._from_dict(d)
    hits = [m for m in _REGISTRY.values() if d.get(m.dict_key) is not None]
    if len(hits) != 1:
        return _legacy_spec(**_checked_legacy(d))
    return hits[0].spec_type._from_dict(d)


def method_of_module(module) -> Method | None:
    """The registered method whose layer `module` is, or None for anything else."""
    for m in _REGISTRY.values():
        if isinstance(module, m.layer_types()):
            return m
    return None


def parse_label(text: str) -> ModuleSpec | None:
    """The spec behind a `label()` (None if no method recognises it)."""
    for m in _REGISTRY.values():
        spec = m.parse_label(text)
        if spec is not None:
            return spec
    return None


def parse_option(text: str) -> ModuleSpec | None:
    """The spec behind a search `option()` string (None if no method recognises it)."""
    for m in _REGISTRY.values():
        spec = m.parse_option(text)
        if spec is not None:
            return spec
    return None


def family_of(methods) -> str:
    """What a plan using these methods is (a trial's `method` when its config names none): the one family of its
    structures ("kronecker", "lowrank", "prune", ...; a modifier counts as the structure it wraps, and only where the
    plan has no structure at all as itself), or "mixed"."""
    found = [get_method(m) for m in methods]
    families = {m.family or m.name for m in found if not m.modifier}
    if not families:
        families = {m.name for m in found}
    return families.pop() if len(families) == 1 else "mixed"


def structure_of(spec: ModuleSpec) -> ModuleSpec:
    """The structure a spec describes: a modifier's inner spec where it wraps one (int8 of a pruned matrix: the
    PruneSpec), else the spec itself (the dense matrix in int8 included)."""
    inner = getattr(spec, "inner", None)
    return inner if inner is not None and get_method(spec.method).modifier else spec


def with_structure(spec: ModuleSpec, structure: ModuleSpec) -> ModuleSpec:
    """`spec` with its structure (`structure_of`) replaced: a modifier's spec wrapping the new one, or the new one."""
    if structure_of(spec) is spec:
        return structure
    from dataclasses import replace

    return replace(spec, inner=structure)


def structure_layer(module):
    """The layer holding a module's structure: a modifier's wrapped layer (`inner`), else the module itself."""
    method = method_of_module(module)
    if method is not None and method.modifier:
        return getattr(module, "inner", module)
    return module


# ----------------------------------------------------------------------------------------------- helpers


def positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(f"{what} must be a positive integer, got {value!r}")
    return value


def check_keys(d: Mapping, valid: Sequence[str], where: str) -> None:
    """PlanError naming an unknown key (with the closest valid one) or a non-mapping."""
    if not isinstance(d, Mapping):
        raise PlanError(f"{where} must be a mapping with keys {', '.join(valid)}; got {type(d).__name__} {d!r}")
    for key in d:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PlanError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(valid)}")


_LEGACY_KEYS = ("shape", "rank", "blocks", "embedding_factor", "lowrank_rank")


def _checked_legacy(d: Mapping) -> dict:
    check_keys(d, _LEGACY_KEYS, "module spec")
    return dict(d)


def _legacy_spec(shape=None, rank: int = 1, blocks: int = 1, embedding_factor=None, lowrank_rank=None) -> ModuleSpec:
    """The first release's flat ModuleSpec arguments -> the typed spec of the method they describe."""
    given = [k for k, v in (("shape", shape), ("embedding_factor", embedding_factor), ("lowrank_rank", lowrank_rank))
             if v is not None]
    if len(given) != 1:
        raise PlanError("a ModuleSpec needs exactly one of shape (Kronecker factors of a linear layer), "
                        "embedding_factor (embeddings) or lowrank_rank (low-rank U·V of a linear layer); got "
                        f"{', '.join(given) if given else 'none'}")
    d = {"shape": shape, "rank": rank, "blocks": blocks, "embedding_factor": embedding_factor,
         "lowrank_rank": lowrank_rank}
    method = next(m for m in _REGISTRY.values() if m.dict_key == given[0])
    return method.spec_type._from_dict({k: v for k, v in d.items() if v is not None})


def unregister(name: str) -> Method:
    """Remove a method from the registry (tests that register a method of their own undo it with this)."""
    method = _REGISTRY.pop(name)
    for alias in method.aliases:
        _ALIASES.pop(alias, None)
    return method
