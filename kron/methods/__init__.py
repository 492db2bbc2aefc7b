"""Compression methods: one subpackage per method (its typed spec, costs, search candidates, labels — torch-free —
and its layers in `layer.py`), behind one registry (`kron.methods.base`). Surgery, save/load, plan files, the search
space and analysis go through the registry and know no method by name.

The built-in methods, in the order error messages list them: `kronecker` (Kronecker factors of linear layers),
`kron_embedding` (A ⊗ B word embeddings), `lowrank` (U·V). Adding one: see the README's developer section.
"""
from .base import (LINEAR_KINDS, Method, ModuleSpec, Slot, all_methods, get_method, method_of_module,  # noqa: F401
                   parse_label, parse_option, register, rule_keys, spec_from_dict, unregister)
from . import kronecker  # noqa: F401,E402  (registers)
from . import kron_embedding  # noqa: F401,E402
from . import lowrank  # noqa: F401,E402

__all__ = ["LINEAR_KINDS", "Method", "ModuleSpec", "Slot", "all_methods", "get_method", "method_of_module",
           "parse_label", "parse_option", "register", "rule_keys", "spec_from_dict", "unregister"]
