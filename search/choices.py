"""The choices of a search space and how they are built from a teacher's matrices (`search.space.SearchSpace`
inherits `ChoiceBuilder`): one categorical `Choice` per (group, layer, block shape), whose options are each
structure method's candidates (`kron.methods`, with its `space.methods` options) in every variant of the listed
modifiers, each with its cost on every size axis; one `BlockChoice` per layer and block of a per-block method
(structured pruning); and which layers are decomposed (`space.layers`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from kron.errors import ConfigError
from kron.modules import Matrix

from .budget import NO_PRUNE
from .config import GROUPS, SpaceConfig
from .model_info import ModelInfo

__all__ = ["KEEP", "BlockChoice", "Choice", "ChoiceBuilder", "parse_option"]

KEEP = "keep"


def parse_option(option: str) -> dict | str:
    """"keep" -> "keep"; "f4" -> {"embedding_factor": 4}; "384x768,2x1,r1" -> {"shape": [...], "rank": 1}: the spec
    dict of a search option (each method owns its option strings)."""
    from kron.methods import parse_option as parse

    if option == KEEP:
        return KEEP
    spec = parse(option)
    if spec is None:
        raise ValueError(f"cannot parse choice {option!r}; expected 'keep', 'f<factor>', 'm1xn1,m2xn2,r<rank>' or "
                         "'lr<rank>'")
    return spec.to_dict()


@dataclass(frozen=True)
class Choice:
    """One categorical decision: the option applied to a set of matrices (one layer's, or all layers' if tied)."""

    key: str
    group: str
    layer: int | None  # None: tied across layers, or outside the numbered layers
    dims: tuple[int, int]  # (rows, cols) of each block
    options: tuple[str, ...]
    matrices: tuple[Matrix, ...]
    # option -> {size axis: Δ} (kron.vocab.AXES: Δparams, Δparams excluding the output embedding, Δmacs, Δbytes)
    # of ONE of `matrices`
    deltas: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def tied(self) -> bool:
        """A choice shared by the matrices of several numbered layers (tie_layers)."""
        return self.layer is None and any(mx.layer is not None for mx in self.matrices)


@dataclass(frozen=True)
class BlockChoice:
    """A per-block method's choice (structured pruning, `kron.methods.prune.search`) for one layer's block — its
    attention ("heads") or FFN ("ffn") — or, with tie_layers, for that block in every searched layer: "none" (the
    block's matrices take their own choices, `members`) or one of the method's options ("0.5": half the units
    removed), which gives every matrix of the block its spec and overrides `members`; with a modifier in the space
    also each option modified ("0.5+int8": pruning + int8)."""

    key: str  # "L3.prune_heads", or "prune_heads" when tied
    part: str  # "heads" | "ffn"
    layer: int | None  # None: tied across layers
    options: tuple[str, ...]  # "none", then the method's options (the fractions removed, ascending; float first)
    members: tuple[str, ...]  # keys of the per-matrix choices of the block's matrices
    names: dict = field(compare=False, hash=False, repr=False)  # layer -> the block's matrix names, model order
    # option -> layer -> {matrix name: PruneSpec option string, "+int8" for int8 (blocks left to `resolved`)}
    specs: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    # option -> layer -> {size axis: Δ} of that layer's block
    deltas: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    method: str = "prune"  # the per-block method whose choice it is

    @property
    def tied(self) -> bool:
        return self.layer is None

    @property
    def layers(self) -> list[int]:
        return sorted(self.names)


class ChoiceBuilder:
    """The construction of a space's choices from its `SpaceConfig` and the teacher's `ModelInfo` (reads
    `self.config`, `self.fixed_layers`, `self.layer_mode`, `self._prunable`, `self._extra_options`,
    `self._dropped_options` of the space being built)."""

    def _layer_mode(self, space: SpaceConfig, info: ModelInfo):
        layers = space.layers
        ids = sorted({m.layer for m in info.matrices if m.layer is not None})
        if not ids:
            return "all", [], None  # only embeddings / non-layer matrices
        if isinstance(layers, list):
            missing = [i for i in layers if i not in ids]
            if missing:
                raise ConfigError(f"space.layers: layers {missing} do not exist; the searched matrices are in layers "
                                  f"{ids[0]}-{ids[-1]} (0-based)")
            return "fixed", list(layers), None
        if layers == "all":
            return "fixed", ids, None
        if layers == "odd":
            return "fixed", [i for i in ids if i % 2 == 1], None
        if layers == "even":
            return "fixed", [i for i in ids if i % 2 == 0], None
        if layers == "free":
            return "free", ids, None
        k = layers.count
        if k > len(ids):
            raise ConfigError(f"space.layers.count: {k} layers requested but the model has {len(ids)} (layers "
                              f"{ids[0]}-{ids[-1]})")
        if k == len(ids):
            return "fixed", ids, None
        return "count", ids, k

    def _options_for(self, group: str, dims: tuple[int, int], kind: str, example: str) -> list[str]:
        """The options of one choice: each structure method's candidates (kron.methods, with its options from
        `space.methods`) or the group's explicit list, then each in every variant of the listed modifiers."""
        from kron.methods import get_method

        sc = self.config
        rows, cols = dims
        methods = sc.structure_methods("embedding" if kind == "embedding" else "linear")
        listed = sc.shapes.get(group) if sc.shapes else None
        if listed:
            specs = self._listed_specs(group, listed, methods, rows, cols, kind, example)
        else:
            specs = [s for name in methods for s in get_method(name).candidates(rows, cols, sc.method_options(name),
                                                                                 sc.span)]
            if not specs and kind != "embedding":
                rng = f"[{sc.min_compression}, {sc.max_compression or 'inf'}]"
                options = "; ".join(f"{n} {sc.method_options(n)}" for n in methods if str(sc.method_options(n)))
                raise ConfigError(
                    f"space: group {group} has no valid factor shape for {example} (each block {rows} x {cols}) with "
                    f"compression in {rng}" + (f", options {options}" if options else "")
                    + "; widen min_compression/max_compression or change the methods' options")
        if kind == "embedding":
            if not specs:
                factors = sorted({f for n in methods for f in getattr(sc.method_options(n), "factors", ())})
                valid = [d for d in range(2, min(cols, 64) + 1) if cols % d == 0]
                raise ConfigError(f"space.embedding_factors: none of {factors} divides the embedding size {cols} of "
                                  f"{example}; valid factors include {valid}")
            specs = sorted(set(specs), key=lambda sp: (sp.compression(rows, cols), sp.label()))
        opts = [sp.option() for sp in specs]
        if kind != "embedding":
            for name in sc.modifier_methods():  # each structure also modified, and the dense matrix
                opts = _with_variants(get_method(name), sc.method_options(name), specs, opts)
        if sc.allow_keep or (sc.shapes and KEEP in sc.shapes.get(group, [])):
            opts = opts + [KEEP]
        return opts

    def _listed_specs(self, group: str, listed, methods, rows: int, cols: int, kind: str, example: str) -> list:
        """The specs of a group's explicit option list (`space.shapes`) that fit this shape bucket."""
        from kron.errors import PlanError
        from kron.methods import Slot, get_method

        sc = self.config
        specs = []
        for o in listed:
            if o == KEEP:
                continue
            spec = _parse_or_error(o, group)
            method = get_method(spec.method)
            slot = Slot(f"space.shapes.{group}", example, "embedding" if kind == "embedding" else "linear", "", rows,
                        cols)
            if kind == "embedding":
                fits = spec.method in methods and spec.compression(rows, cols) > 1
                try:
                    spec.check(slot)
                except PlanError:
                    fits = False
                if not fits:
                    raise ConfigError(f"space.shapes.{group}: {o!r} is not a valid embedding factor for "
                                      f"{example} ({rows} x {cols}); write f<k> with k dividing {cols}")
                specs.append(spec)
                continue
            if "embedding" in method.module_kinds:
                raise ConfigError(f"space.shapes.{group}: {o!r} is an embedding factor; {group} holds linear "
                                  f"layers: write m1xn1,m2xn2,r<rank>")
            if method.block_parts:
                raise ConfigError(f"space.shapes.{group}: {o!r} is a {spec.method} option; {method.block_hint}")
            if spec.method not in methods:
                raise ConfigError(f"space.shapes.{group}: {o!r} is a {spec.method} option but space.methods is "
                                  f"{sc.method_names()}; add {spec.method!r} to space.methods")
            try:
                spec.check(slot)
            except PlanError:
                continue  # fits another shape bucket of this group (e.g. Llama K/V vs Q)
            if spec.params(rows, cols) >= rows * cols:
                raise ConfigError(f"space.shapes.{group}: {o!r} does not compress {example} ({rows} x {cols})")
            specs.append(spec)
        if not specs and kind != "embedding":
            raise ConfigError(f"space.shapes.{group}: none of {sc.shapes[group]} fits {example} "
                              f"(each block {rows} x {cols}, out x in); need m1·m2 = {rows} and n1·n2 = {cols}")
        return specs

    @staticmethod
    def _option_cost(option: str, rows: int, cols: int, kind: str) -> tuple[int, int]:
        """(Δparams, Δmacs) of one block under `option` against its dense weight."""
        from kron.methods import parse_option as parse_spec

        if option == KEEP:
            return 0, 0
        sp = parse_spec(option)
        return sp.params(rows, cols) - rows * cols, (sp.macs(rows, cols) - rows * cols if kind != "embedding" else 0)

    @staticmethod
    def _option_bytes(option: str, rows: int, cols: int, width: int) -> int:
        """Δbytes of one block under `option` against its dense weight of `width`-byte floats (int8: 1 + scales)."""
        from kron.methods import parse_option as parse_spec

        if option == KEEP:
            return 0
        return parse_spec(option).bytes(rows, cols, width) - rows * cols * width

    def _prunable_blocks(self, space: SpaceConfig, info: ModelInfo) -> dict:
        """method -> (layer, part) -> {matrix name: context} of the blocks each per-block method (prune) may choose
        for: its own decision (`Method.choosable_blocks`) over the searched matrices of the decomposed layers."""
        from kron.methods import get_method

        searched = {mx.name: mx.group for mx in info.matrices if mx.layer in set(self.fixed_layers)}
        loose = [(mx.name, mx.group) for mx in info.matrices if mx.layer in set(self.fixed_layers)
                 and mx.kind != "embedding"]
        out = {}
        for name in space.block_methods():
            contexts = (getattr(info, "block_contexts", None) or {}).get(name, {})
            out[name] = get_method(name).choosable_blocks(
                contexts, searched, self.fixed_layers, tie_layers=space.tie_layers, fixed=self.layer_mode == "fixed",
                groups=space.groups, others=bool(space.structure_methods()), loose=loose)
        return out

    def _build_blocks(self, space: SpaceConfig, info: ModelInfo) -> list[BlockChoice]:
        """The block choices of the per-block methods (see `BlockChoice`), each layer's parts in the method's
        order."""
        from kron.methods import get_method

        mats = {mx.name: (mx.m, mx.n, mx.blocks) for mx in info.matrices}
        out = []
        for name, prunable in self._prunable.items():
            method = get_method(name)
            parts = list(method.block_parts)
            variants = [("", None)] if _keeps_float(space) else []
            for mod in space.modifier_methods():
                m, mo = get_method(mod), space.method_options(mod)
                variants += [("+" + v.option(), lambda sp, m=m, mo=mo, j=j: m.variants(sp, mo)[j])
                             for j, v in enumerate(m.variants(None, mo))]
            per_key: dict[tuple, dict[int, dict]] = {}
            for (layer, part), block in prunable.items():
                per_key.setdefault((None if space.tie_layers else layer, part), {})[layer] = block
            for (layer, part), blocks in sorted(per_key.items(), key=lambda kv: (-1 if kv[0][0] is None else kv[0][0],
                                                                                 parts.index(kv[0][1]))):
                key = f"{name}_{part}" if layer is None else f"L{layer}.{name}_{part}"
                specs, deltas = method.block_options(part, blocks, mats, space.method_options(name),
                                                     self._extra_options.get(key, ()), variants, info.float_width)
                if not specs:
                    continue  # e.g. a single head: nothing to prune
                members = tuple(c.key for c in self.choices if c.group in method.block_parts[part]
                                and c.layer == layer and (layer is not None or c.tied))
                names = {i: list(b) for i, b in blocks.items()}
                out.append(BlockChoice(key, part, layer, (NO_PRUNE, *specs), members, names, specs, deltas, name))
        return out

    def _build_choices(self, space: SpaceConfig, info: ModelInfo) -> list[Choice]:
        active_layers = set(self.fixed_layers)
        # with a per-block method (prune) as the only linear one, a block's matrices have no choice of their own
        block_only = set() if space.structure_methods() else {
            n for blocks in self._prunable.values() for block in blocks.values() for n in block}
        buckets: dict[tuple, list[Matrix]] = {}
        for mx in info.matrices:
            if mx.layer is not None and mx.layer not in active_layers:
                continue
            if mx.name in block_only:
                continue
            tied = space.tie_layers or mx.layer is None
            layer = None if tied else mx.layer
            buckets.setdefault((mx.group, layer, mx.block_dims, mx.kind == "embedding"), []).append(mx)
        # groups whose matrices come in several shapes get the shape in the key
        shapes_per_group: dict[str, set] = {}
        for (g, _, dims, _), _ in buckets.items():
            shapes_per_group.setdefault(g, set()).add(dims)
        order = {g: i for i, g in enumerate(list(GROUPS) + list(space.modules or {}))}
        choices = []
        for (g, layer, dims, is_emb), mats in sorted(
                buckets.items(), key=lambda kv: (-1 if kv[0][1] is None else kv[0][1], order[kv[0][0]], kv[0][2])):
            key = g if layer is None else f"L{layer}.{g}"
            if len(shapes_per_group[g]) > 1:
                key += f".{dims[0]}x{dims[1]}"
            kind = "embedding" if is_emb else "linear"
            opts = self._options_for(g, dims, kind, mats[0].name)
            dropped = self._dropped_options.get(key, ())
            opts = [o for o in opts if o not in dropped]
            for extra in self._extra_options.get(key, ()):  # a seed plan's options the space would not sample
                if extra in opts:
                    continue
                if extra == KEEP or opts[-1:] != [KEEP]:
                    opts.append(extra)
                else:
                    opts.insert(len(opts) - 1, extra)  # "keep" stays last
            deltas = {}
            blocks = mats[0].blocks  # equal within a bucket: same group, same block dims
            for o in opts:
                dp, dm = self._option_cost(o, *dims, kind)
                d_excl, d_macs = dp * blocks, dm * blocks
                d_all = d_excl
                d_bytes = blocks * self._option_bytes(o, *dims, info.float_width)
                if o != KEEP and is_emb and info.tied_input_embedding == mats[0].name:
                    d_all += mats[0].m * mats[0].n  # the LM head keeps a dense copy of the table
                    d_bytes += mats[0].m * mats[0].n * info.float_width
                deltas[o] = {"params": d_all, "params_excl_output_embedding": d_excl, "macs_per_token": d_macs,
                             "bytes": d_bytes}
            choices.append(Choice(key, g, layer, dims, tuple(opts), tuple(mats), deltas))
        return choices


def _parse_or_error(option: str, group: str):
    from kron.methods import parse_option as parse_spec

    spec = parse_spec(option)
    if spec is not None:
        return spec
    try:
        return parse_option(option)
    except ValueError as exc:
        raise ConfigError(f"space.shapes.{group}: {exc}") from None


def _with_variants(method, options, specs: list, opts: list[str]) -> list[str]:
    """`opts` (the options of `specs`, a choice's structures), then in each variant of a modifier (int8, int4): every
    structure modified and the dense matrix modified; without the unmodified ones where the modifier says so."""
    dense = method.variants(None, options)
    wrapped = [method.variants(sp, options) for sp in specs]
    out = list(opts) if method.keeps_unmodified(options) else []
    for j in range(len(dense)):
        out += [w[j].option() for w in wrapped if len(w) == len(dense)] + [dense[j].option()]
    return out


def _keeps_float(space: SpaceConfig) -> bool:
    """Whether the space offers unmodified structures (every modifier keeps them: float weights beside int8)."""
    from kron.methods import get_method

    return all(get_method(n).keeps_unmodified(space.method_options(n)) for n in space.modifier_methods())
