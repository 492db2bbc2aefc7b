"""Compression plans: which modules of a model become Kronecker layers, and with which factor shapes.

A plan is a list of rules applied in order (a later rule overrides an earlier one for the modules both match),
over a default of "keep" (stay dense). As YAML:

    version: 1
    default: keep
    rules:
      - select: transformer.wte              # exact name, or a `.suffix` of it (peft-style)
        embedding_factor: 2                  # nn.Embedding v x d -> A (v x d/2) ⊗ B (1 x 2)
      - select: "h.*.mlp.c_fc"               # glob (fnmatch; `*` also crosses dots)
        layers: odd                          # odd | even | all | 3 | [0, 2, "4-7"]
        shape: [1536, 768, 2, 1]             # (m1, n1, m2, n2) for the (out x in) weight
      - select: "re:.*\\.attn\\.c_attn"      # regex, full match on the dotted name
        factor: 4                            # nearest valid shape to 4x compression (see `nearest_shape`)
        blocks: 3                            # fused [Q; K; V]: each block factored separately
        rank: 1                              # number of summed Kronecker products
      - select: transformer.h.0.mlp.c_fc
        keep: true                           # per-module override back to dense
      - select: mlp.c_proj                   # the low-rank baseline instead of Kronecker: W ≈ U (m x r) · V (r x n)
        lowrank_ratio: 2                     # r = max(1, floor(m·n / (2·(m + n)))); or `lowrank_rank: r`

Selectors: `re:PATTERN` is a regex full match on the dotted module name; a pattern with `*`, `?` or `[` is an
fnmatch glob; anything else must equal the name. A non-regex selector may match the full name or any dotted
suffix of it, so `mlp.c_fc` selects `transformer.h.3.mlp.c_fc` (peft's `target_modules` rule). The layer index of
a module is the first all-digit component of its name (`transformer.h.3.mlp.c_fc` -> 3, zero-based); with a
`layers` filter, modules without one (embeddings, heads) never match.

`CompressionPlan.resolve(model)` validates a plan against a concrete model and returns name -> ModuleSpec | "keep"
for every module the plan could touch (nn.Linear, transformers' Conv1D, nn.Embedding).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from regex import error as regex_error
from torch import nn

from . import methods
from .errors import PlanError
from .methods.base import (ModuleSpec, Slot, alternatives_message, check_keys, choice_message, method_of_key,
                           modifier_keys, option_defaults, positive_int, primary_keys, structure_of)
from .methods.kronecker import nearest_shape
from .modules import SUPPORTED_TYPES, dense_dims, layer_index, module_type, unsupported_message
from .selectors import compile_regex, selector_matches
from .yamlio import dump_yaml

__all__ = [
    "KEEP",
    "SUPPORTED_TYPES",
    "CompressionPlan",
    "ModuleSpec",
    "Rule",
    "dense_dims",
    "layer_index",
    "module_type",
    "nearest_shape",
    "selector_matches",
]

KEEP = "keep"
PLAN_VERSION = 1
_PLAN_KEYS = ("version", "name", "description", "default", "rules")


# ----------------------------------------------------------------------------------------------- rules


def _parse_layers(value, where: str):
    """None | "all" | "odd" | "even" | tuple of ints (from an int, "3-5", "1,3" or a list of those)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in ("all", "odd", "even"):
        return value.strip().lower()
    items = value if isinstance(value, (list, tuple)) else [value]
    out: set[int] = set()
    bad = (f"{where}: layers must be 'all', 'odd', 'even', a layer index, a range 'a-b' or a list of those, "
           f"got {value!r}")
    for item in items:
        if isinstance(item, bool):
            raise PlanError(bad)
        if isinstance(item, int):
            if item < 0:
                raise PlanError(bad)
            out.add(item)
            continue
        if not isinstance(item, str):
            raise PlanError(bad)
        for part in item.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if m is None:
                raise PlanError(bad)
            lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
            if hi < lo:
                raise PlanError(f"{where}: layer range {part.strip()!r} is empty (write low-high)")
            out.update(range(lo, hi + 1))
    if not out:
        raise PlanError(bad)
    return tuple(sorted(out))


def _layers_match(layers, index: int | None) -> bool:
    if layers is None:
        return True
    if index is None:
        return False
    if layers == "all":
        return True
    if layers == "odd":
        return index % 2 == 1
    if layers == "even":
        return index % 2 == 0
    return index in layers


class Rule:
    """One plan rule: the modules it selects and what they become.

    select: one selector or a list (see the module docstring); each must match at least one module.
    layers: None (no filter), "all", "odd", "even", or layer indices (ints / "a-b" ranges).
    keep: True keeps the selected modules dense, overriding earlier rules.
    **options: otherwise the keys of exactly one compression method (`kron.methods`): shape | factor (Kronecker;
        with rank and blocks), embedding_factor (nn.Embedding), lowrank_rank | lowrank_ratio (low-rank U·V; with
        blocks). The method validates them and turns them into a spec for each selected module.
    """

    def __init__(self, select, layers=None, keep: bool = False, *, where: str = "rule", **options):
        w = where
        sel = select
        if isinstance(sel, str):
            sel = (sel,)
        if (not isinstance(sel, (list, tuple)) or not sel
                or any(not isinstance(s, str) or not s.strip() for s in sel)):
            raise PlanError(f"{w}: select must be a non-empty module selector or a list of them, got {select!r}")
        for s in sel:
            if s.startswith("re:"):
                try:
                    compile_regex(s[3:])
                except regex_error as exc:
                    raise PlanError(f"{w}: select {s!r} is not a valid regular expression ({exc})") from None
        check_keys(options, [k for k in methods.rule_keys() if k not in ("select", "layers", "keep")], w)
        self.select: tuple[str, ...] = tuple(sel)
        self.layers = _parse_layers(layers, w)
        self.where = w
        if not isinstance(keep, bool):
            raise PlanError(f"{w}: keep must be true or false, got {keep!r}")
        self.keep = keep
        given = [k for k in primary_keys() if k in options and options[k] is not None]
        # modifiers (quantize: int8) go beside the structure's key, or alone: the dense matrix modified
        mods = [k for k in modifier_keys() if k in options and options[k] is not None]
        defaults = option_defaults()
        options = {k: v for k, v in options.items() if v is not None}
        self.modifiers: tuple = ()
        if keep:
            extra = given + mods + [k for k, d in defaults.items() if options.get(k, d) != d]
            if extra:
                raise PlanError(f"{w}: keep: true cannot be combined with {', '.join(extra)}")
            self.method, self.options = None, {}
            return
        if len(given) != 1 and not (not given and mods):
            raise PlanError(f"{w}: {choice_message()} (got {', '.join(given) if given else 'none'})"
                            f"{alternatives_message()}")
        for k in defaults:
            if k in options:
                positive_int(options[k], f"{w}: {k}")
        self.modifiers = tuple(dict.fromkeys(method_of_key(k) for k in mods))
        self.method = method_of_key(given[0]) if given else self.modifiers[0]
        for mod in self.modifiers:
            if mod is not self.method:
                options = mod.validate_rule(options, w)
        self.options = self.method.validate_rule(options, w)

    def __getattr__(self, key: str):
        # rule.shape, rule.rank, rule.lowrank_ratio ...: the method options under their plan-file names, as in the
        # first release (None when not given, the default for rank and blocks)
        if key in methods.rule_keys() and key not in ("select", "layers", "keep"):
            return self.__dict__.get("options", {}).get(key, option_defaults().get(key))
        raise AttributeError(f"'Rule' object has no attribute {key!r}")

    def method_names(self) -> list[str]:
        """The methods its rules use (structures and modifiers; keep rules left out), in rule order."""
        out: list[str] = []
        for rule in self.rules:
            for m in (rule.method, *rule.modifiers):
                if m is not None and m.name not in out:
                    out.append(m.name)
        return out

    def __eq__(self, other) -> bool:
        return (isinstance(other, Rule) and (self.select, self.layers, self.keep, self.options)
                == (other.select, other.layers, other.keep, other.options))

    def __repr__(self) -> str:
        return f"Rule({self.to_dict()!r})"

    def matches(self, name: str) -> bool:
        return _layers_match(self.layers, layer_index(name)) and any(selector_matches(s, name) for s in self.select)

    def spec_for(self, name: str, module: nn.Module, *, split: str | None = None,
                 model: nn.Module | None = None) -> ModuleSpec:
        """The concrete spec of this rule for one module, validated against its size. split: the side `factor:`
        rules prefer to split among equally compressing shapes ("output", the default, or "input"). model: the
        model `module` belongs to, for structured methods (`prune`) that need to know its attention/FFN block."""
        kind = module_type(module)
        if kind is None:
            raise PlanError(f"{self.where}: {unsupported_message(name, module)}")
        m, n = dense_dims(module)
        context = self.method.plan_context(model, name, module) if model is not None else None
        slot = Slot(self.where, name, kind, type(module).__name__, m, n, split, context)
        spec = self.method.spec_for(self.options, slot)
        for mod in self.modifiers:
            if mod is not self.method:
                spec = mod.modify(spec, self.options, slot)
        return spec

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"select": self.select[0] if len(self.select) == 1 else list(self.select)}
        if self.layers is not None:
            out["layers"] = self.layers if isinstance(self.layers, str) else list(self.layers)
        if self.keep:
            out["keep"] = True
            return out
        out.update(self.method.rule_to_dict(self.options))
        for mod in self.modifiers:
            out.update(mod.rule_to_dict(self.options))
        return out

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "rule") -> "Rule":
        check_keys(d, methods.rule_keys(), where)
        if "select" not in d:
            raise PlanError(f"{where}: missing key 'select' (the modules the rule applies to)")
        return cls(where=where, **{k: d[k] for k in d})


# ----------------------------------------------------------------------------------------------- plan


class CompressionPlan:
    """An ordered list of `Rule`s over a default of "keep"; later rules override earlier ones.

    Build one with `CompressionPlan([...rules...])`, `.add(select, ...)`, `from_dict`, `from_yaml`, `load`, or
    `kron.presets.preset_plan`. `resolve(model)` checks it against a model.
    """

    def __init__(self, rules: Iterable[Rule | Mapping] = (), *, default: str = KEEP, name: str | None = None,
                 description: str | None = None):
        if default != KEEP:
            raise PlanError(f"plan: default must be 'keep' (modules no rule selects stay dense), got {default!r}")
        for key, value in (("name", name), ("description", description)):
            if value is not None and not isinstance(value, str):
                raise PlanError(f"plan: {key} must be a string, got {value!r}")
        self.default = default
        self.name = name
        self.description = description
        self.rules: list[Rule] = []
        for r in rules:
            self._append(r)

    def _append(self, rule: Rule | Mapping) -> None:
        where = f"rule {len(self.rules) + 1}"
        if isinstance(rule, Rule):
            rule = Rule.from_dict(rule.to_dict(), where)
        else:
            rule = Rule.from_dict(rule, where)
        self.rules.append(rule)

    def add(self, select: str | Sequence[str], **kwargs) -> "CompressionPlan":
        """Append a rule (keyword arguments as in `Rule`); returns the plan for chaining."""
        self._append({"select": select, **kwargs})
        return self

    def __eq__(self, other) -> bool:
        return isinstance(other, CompressionPlan) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"CompressionPlan(name={self.name!r}, rules={len(self.rules)})"

    # --------------------------------------------------------------------------------- serialisation

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"version": PLAN_VERSION}
        if self.name is not None:
            out["name"] = self.name
        if self.description is not None:
            out["description"] = self.description
        out["default"] = self.default
        out["rules"] = [r.to_dict() for r in self.rules]
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> "CompressionPlan":
        check_keys(d, _PLAN_KEYS, "plan")
        version = d.get("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise PlanError(f"plan: version {version!r} is not supported (this kronsearch reads version "
                            f"{PLAN_VERSION})")
        rules = d.get("rules")
        if rules is None:
            rules = []
        if not isinstance(rules, list):
            raise PlanError(f"plan: rules must be a list of rules, got {type(rules).__name__}")
        return cls(rules, default=d.get("default", KEEP), name=d.get("name"), description=d.get("description"))

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "plan") -> "CompressionPlan":
        """Parse YAML (or JSON, a subset of YAML) with yaml's safe loader, within `kron.yamlio.load_yaml`'s caps."""
        import yaml

        from .yamlio import YamlTooLarge, load_yaml

        try:
            data = load_yaml(text)
        except YamlTooLarge as exc:
            raise PlanError(f"{source}: too large to read: {exc}") from None
        except yaml.YAMLError as exc:
            raise PlanError(f"{source}: not valid YAML/JSON ({' '.join(str(exc).split())})") from None
        if not isinstance(data, Mapping):
            raise PlanError(f"{source}: a plan is a mapping with keys {', '.join(_PLAN_KEYS)}; "
                            f"got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except PlanError as exc:
            raise PlanError(f"{source}: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "CompressionPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan: not valid JSON ({exc})") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        """Write the plan atomically: JSON if the name ends in .json, else YAML."""
        from .fsutil import atomic_write_text

        path = Path(path)
        text = self.to_json() + "\n" if path.suffix.lower() == ".json" else self.to_yaml()
        return atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> "CompressionPlan":
        """Read a plan from a .yaml/.yml/.json file."""
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise PlanError(f"{path}: not a text plan file (YAML/JSON expected; {exc.reason} at byte {exc.start})") \
                from None
        return cls.from_yaml(text, source=str(path))

    # --------------------------------------------------------------------------------- resolution

    def assign(self, model: nn.Module) -> dict[str, int]:
        """Module name -> index of the last rule selecting it (rules applied in order), after checking that every
        selector matches something and every layer filter keeps something."""
        names = [n for n, _ in model.named_modules() if n]
        modules = dict(model.named_modules())
        layer_ids = sorted({i for i in map(layer_index, names) if i is not None})
        owner: dict[str, int] = {}
        for i, rule in enumerate(self.rules):
            hits: list[str] = []
            for sel in rule.select:
                found = [n for n in names if selector_matches(sel, n)]
                if not found:
                    raise PlanError(_no_match_message(rule, sel, names, modules))
                hits.extend(found)
            if rule.layers is not None:
                if isinstance(rule.layers, tuple):
                    missing = [k for k in rule.layers if k not in layer_ids]
                    if missing:
                        raise PlanError(f"{rule.where}: layers {missing} do not exist; the model has layers "
                                        f"{_ranges(layer_ids) if layer_ids else '(none)'}")
                kept = [n for n in hits if _layers_match(rule.layers, layer_index(n))]
                if not kept:
                    have = sorted({layer_index(n) for n in hits} - {None})
                    raise PlanError(f"{rule.where}: select {_fmt_select(rule)} matched {len(set(hits))} modules but "
                                    f"none in layers {_fmt_layers(rule.layers)} (their layers: "
                                    f"{_ranges(have) if have else 'none: they are outside the numbered layers'})")
                hits = kept
            for n in hits:
                owner[n] = i
        return owner

    def resolve(self, model: nn.Module, *, split: str | None = None) -> dict[str, ModuleSpec | str]:
        """Name -> ModuleSpec | "keep", in model order, for every supported module (nn.Linear, Conv1D, nn.Embedding)
        and every module a rule selects. Raises PlanError when the plan does not fit the model.

        split: among equally compressing shapes, `factor:` rules (and the `uniform:` preset) split the "output"
        (default; the papers' tie-break) or the "input" (what data-aware init serves best)."""
        if split is not None and split not in ("output", "input"):
            raise PlanError(f"split must be 'output' or 'input', got {split!r}")
        owner = self.assign(model)
        out: dict[str, ModuleSpec | str] = {}
        for name, module in model.named_modules():
            if not name:
                continue
            i = owner.get(name)
            rule = self.rules[i] if i is not None else None
            if rule is None or rule.keep:
                if module_type(module) is not None:
                    out[name] = KEEP
                continue
            out[name] = rule.spec_for(name, module, split=split, model=model)
        check_together(out, model)
        return out

    @classmethod
    def from_resolved(cls, resolved: Mapping[str, ModuleSpec | str | Mapping], **kwargs) -> "CompressionPlan":
        """A plan of exact-name rules (anchored regexes) reproducing a resolved mapping."""
        rules = []
        for name, spec in resolved.items():
            if spec == KEEP:
                continue
            spec = spec if isinstance(spec, ModuleSpec) else ModuleSpec.from_dict(spec)
            rules.append(Rule(select=("re:" + re.escape(name),), **spec.to_rule()))
        return cls(rules, **kwargs)


def check_together(specs: Mapping[str, ModuleSpec | str], model: nn.Module) -> None:
    """Each method's check that its specs fit together (a structured method's blocks; `Method.check_resolved`). A
    structure wrapped by a modifier (int8 of a pruned matrix) is checked as the structure, with the others of its
    block whether they are quantised or not."""
    by_method: dict[str, dict[str, ModuleSpec]] = {}
    for name, spec in specs.items():
        if isinstance(spec, ModuleSpec):
            structure = structure_of(spec)
            by_method.setdefault(structure.method, {})[name] = structure
    for method_name, own in by_method.items():
        methods.get_method(method_name).check_resolved(own, model)


def _fmt_select(rule: Rule) -> str:
    return repr(rule.select[0]) if len(rule.select) == 1 else repr(list(rule.select))


def _fmt_layers(layers) -> str:
    return layers if isinstance(layers, str) else _ranges(list(layers))


def _ranges(ids: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    ids = sorted(ids)
    parts, start = [], None
    for k, v in enumerate(ids):
        if start is None:
            start = v
        if k + 1 == len(ids) or ids[k + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def _no_match_message(rule: Rule, selector: str, names: list[str], modules: Mapping[str, nn.Module]) -> str:
    examples = _example_names(names, modules)
    ids = sorted({i for i in map(layer_index, names) if i is not None})
    layers = f" (layers {_ranges(ids)})" if ids else ""
    return (f"{rule.where}: selector {selector!r} matches no module of this model (patterns of the rule: "
            f"{', '.join(repr(s) for s in rule.select)}). A plain selector must equal a module name or a "
            f"dotted suffix of it, a glob uses * ? [ ], a regex starts with 're:'. Module names look like: "
            f"{', '.join(examples)}{layers}")


def _example_names(names: list[str], modules: Mapping[str, nn.Module], count: int = 10) -> list[str]:
    """Supported modules outside the numbered layers or in the first one: a representative sample."""
    first = min((i for i in map(layer_index, names) if i is not None), default=None)
    picked = [n for n in names if module_type(modules[n]) is not None and layer_index(n) in (None, first)]
    return (picked or names)[:count]
