"""YAML text for plans and configs: writing (short lists of scalars inline ([384, 768, 2, 1]), keys in order) and
reading with bounds (`load_yaml`).

pyyaml only (no torch), so `analysis` writes plans in exactly the layout `CompressionPlan.to_yaml` uses.

Reading is `yaml.SafeLoader` (no object construction) plus two caps a hostile file would otherwise get past: the
text's size, and the number of values the document stands for once its aliases are expanded — a "billion laughs"
file of 8 levels of `&a [*b, *b, ...]` is a few hundred bytes that validation then walks as ~10^9 values (17 s and
3.9 GB before this cap). The expanded size is counted on the composed node graph, shared nodes once per use, in
time linear in the file.
"""
from __future__ import annotations

import yaml

__all__ = ["MAX_YAML_BYTES", "MAX_YAML_VALUES", "YamlTooLarge", "dump_yaml", "load_yaml"]

MAX_YAML_BYTES = 16 * 2**20  # a plan for a 70B model with one rule per matrix is well under 1 MB
MAX_YAML_VALUES = 1_000_000  # scalars, sequences and mappings after alias expansion


class YamlTooLarge(ValueError):
    """A YAML text over `MAX_YAML_BYTES`, or one whose aliases expand to more than `MAX_YAML_VALUES` values."""


def _expanded_values(root) -> int:
    """Values the node graph stands for with every alias expanded (memoised per node; cycles count once)."""
    sizes: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes and not done:
            continue
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            sizes[id(node)] = 1
            continue
        if not done:
            sizes.setdefault(id(node), 1)  # a cycle back to this node counts once
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
            continue
        total = 1 + sum(sizes.get(id(c), 1) for c in children)
        sizes[id(node)] = total
        if total > MAX_YAML_VALUES:
            return total
    return sizes.get(id(root), 0)


def load_yaml(text: str):
    """`yaml.safe_load(text)` within the caps above (`YamlTooLarge` past them; `yaml.YAMLError` for bad YAML)."""
    if len(text) > MAX_YAML_BYTES:
        raise YamlTooLarge(f"{len(text):,} characters, more than the {MAX_YAML_BYTES:,} kronsearch reads")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        n = _expanded_values(node)
        if n > MAX_YAML_VALUES:
            raise YamlTooLarge(f"its aliases expand to more than {MAX_YAML_VALUES:,} values (a YAML alias bomb?)")
        return loader.construct_document(node)
    finally:
        loader.dispose()


class _FlowListDumper(yaml.SafeDumper):
    pass


def _represent_list(dumper, data):
    flow = all(isinstance(v, (int, float, str)) for v in data) and len(data) <= 16
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _represent_list)


def dump_yaml(obj) -> str:
    """Safe YAML of plain data (dicts, lists, scalars); short scalar lists flow-style, insertion order kept."""
    return yaml.dump(obj, Dumper=_FlowListDumper, sort_keys=False, allow_unicode=True, width=120)
