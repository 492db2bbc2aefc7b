"""kronsearch's core: Kronecker factorisation of Transformer weights and the module surgery around it.

Pure torch (transformers is imported only where a transformers model is loaded or saved); no Ray, no plotting.

    from kron import load_model, preset_plan, compress, save_compressed
    model = load_model("config:gpt2")
    report = compress(model, preset_plan("kngpt2", model.config))
    print(report.summary())
"""
import importlib

from . import errors

# Public names -> the submodule defining them. Imported on first use (PEP 562), so `import kron.errors` or
# `import kron.fsutil` (used by `analysis`, which must stay free of torch) does not pull in torch.
_EXPORTS = {
    "drop_layers": "baselines", "save_layerdrop": "baselines",
    "factor_shapes": "factor", "nearest_kronecker": "factor", "nearest_lowrank": "factor",
    "load_compressed": "io", "merge": "io", "save_compressed": "io",
    "FusedKroneckerLinear": "layers", "KroneckerEmbedding": "layers", "KroneckerLinear": "layers",
    "FusedLowRankLinear": "layers", "LowRankLinear": "layers",
    "load_config": "models", "load_model": "models", "pick_device": "devices",
    "CompressionPlan": "plan", "ModuleSpec": "plan", "Rule": "plan", "nearest_shape": "plan",
    "PRESETS": "presets", "preset_plan": "presets",
    "CompressionReport": "surgery", "compress": "surgery", "count_params": "surgery", "macs_per_token": "surgery",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kron' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("kronsearch")
    except Exception:  # a source tree that was never installed
        return "0+unknown"


__version__ = _version()

__all__ = [
    "CompressionPlan",
    "CompressionReport",
    "FusedKroneckerLinear",
    "FusedLowRankLinear",
    "KroneckerEmbedding",
    "KroneckerLinear",
    "LowRankLinear",
    "ModuleSpec",
    "PRESETS",
    "Rule",
    "__version__",
    "compress",
    "count_params",
    "drop_layers",
    "errors",
    "factor_shapes",
    "load_compressed",
    "load_config",
    "load_model",
    "macs_per_token",
    "merge",
    "nearest_kronecker",
    "nearest_lowrank",
    "nearest_shape",
    "pick_device",
    "preset_plan",
    "save_compressed",
    "save_layerdrop",
]
