"""YAML text for plans and configs: short lists of scalars inline ([384, 768, 2, 1]), keys in order.

pyyaml only (no torch), so `analysis` writes plans in exactly the layout `CompressionPlan.to_yaml` uses.
"""
from __future__ import annotations

import yaml

__all__ = ["dump_yaml"]


class _FlowListDumper(yaml.SafeDumper):
    pass


def _represent_list(dumper, data):
    flow = all(isinstance(v, (int, float, str)) for v in data) and len(data) <= 16
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _represent_list)


def dump_yaml(obj) -> str:
    """Safe YAML of plain data (dicts, lists, scalars); short scalar lists flow-style, insertion order kept."""
    return yaml.dump(obj, Dumper=_FlowListDumper, sort_keys=False, allow_unicode=True, width=120)
