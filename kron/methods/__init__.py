"""Compression methods: one subpackage per method, owning everything about it — its typed spec and costs, its
search options (`MethodOptions`: its section of `space.methods`), its candidates for a matrix, its damage model and
data-aware init, its labels (all torch-free in its `__init__.py`) and its layers in `layer.py` — behind one registry
(`kron.methods.base`). Surgery, save/load, plan files, the search space, profiles, the knapsack and analysis go
through the registry and know no method by name.

The built-in methods, in the order error messages list them (`Method.order`): `kronecker` (Kronecker factors of
linear layers), `kron_embedding` (A ⊗ B word embeddings), `lowrank` (U·V), `prune` (structured pruning of heads and
FFN neurons), and the modifier `quant` (8- or 4-bit weights, aliases `int8` / `int4`, stacked on any structure).
Every subpackage of this folder is imported (and so registered) on first use: adding a method is adding a folder;
see docs/extending.md.
"""
from .base import (LINEAR_KINDS, Method, MethodOptions, ModuleSpec, Slot, Span, all_methods, get_method,  # noqa: F401
                   method_of_module, parse_label, parse_option, register, rule_keys, spec_from_dict, structure_of,
                   unregister)

def _discover() -> None:
    """Import every method subpackage of kron/methods (each registers itself): a new method is a new folder."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.ispkg:
            importlib.import_module(f"{__name__}.{info.name}")


_discover()

__all__ = ["LINEAR_KINDS", "Method", "MethodOptions", "ModuleSpec", "Slot", "Span", "all_methods", "get_method",
           "method_of_module", "parse_label", "parse_option", "register", "rule_keys", "spec_from_dict",
           "structure_of", "unregister"]
