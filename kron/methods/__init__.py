"""Compression methods: one subpackage per method (its typed spec, costs, search candidates, labels — torch-free —
and its layers in `layer.py`), behind one registry (`kron.methods.base`). Surgery, save/load, plan files, the search
space and analysis go through the registry and know no method by name.

The built-in methods, in the order error messages list them (`Method.order`): `kronecker` (Kronecker factors of
linear layers), `kron_embedding` (A ⊗ B word embeddings), `lowrank` (U·V). Every subpackage of this folder is
imported (and so registered) on first use: adding a method is adding a folder; see the README's developer section.
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
