"""Loading models to compress: local directories (safetensors only), hub names, or architecture-only specs.

Model sources (`src`):
- a local transformers model directory with config.json and model.safetensors (or a sharded index);
  a directory written by `kron.io.save_compressed` is loaded with `load_compressed`;
- a Hugging Face Hub name such as `openai-community/gpt2` (needs network, or the local hub cache);
- `config:gpt2` or `config:bert-base-uncased`: the real architecture with random weights, known offline;
- `config:PATH` with PATH a config.json (or a directory holding one): that architecture with random weights.
Random weights are drawn under `torch.manual_seed(seed)` inside a forked RNG, so they are reproducible and leave
the caller's RNG state alone.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from .devices import parse_dtype, pick_device
from .errors import CheckpointError, ConfigError, DataError, one_line
from .vocab import DEMO

__all__ = ["KNOWN_CONFIGS", "TASKS", "build_from_config", "is_causal_lm", "load_config", "load_model",
           "load_tokenizer", "max_positions", "parse_dtype", "pick_device", "task_of"]

TASKS = ("auto", "causal-lm", "sequence-classification", "base")
KNOWN_CONFIGS = {
    "gpt2": "GPT-2 small: 12 layers, d=768, 12 heads, FFN 3072, vocab 50257, 1024 positions (124,439,808 params)",
    "bert-base-uncased": "BERT-base: 12 layers, d=768, 12 heads, FFN 3072, vocab 30522, 512 positions",
}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


# ----------------------------------------------------------------------------------------------- the demo teacher

DEMO_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def demo_teacher_dir() -> Path:
    """The directory of the bundled demo teacher (GPT-2, 4 layers, WikiText-2); loadable with from_pretrained."""
    from importlib.resources import files

    path = Path(str(files("kron") / "demo_teacher"))
    missing = [name for name in DEMO_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"the bundled demo teacher in {path} is incomplete (missing {', '.join(missing)}); reinstall kronsearch "
            "or rebuild it with benchmarks/train_demo_teacher.sh"
        )
    return path


def resolve_source(src: str | os.PathLike) -> str:
    """'demo' (kron.vocab.DEMO) -> the bundled demo teacher's directory; anything else unchanged (as a string)."""
    text = os.fspath(src)
    return str(demo_teacher_dir()) if text == DEMO else text


def _known_config(name: str):
    from transformers import BertConfig, GPT2Config

    if name == "gpt2":
        # GPT2Config()'s defaults are GPT-2 small's sizes
        return GPT2Config(architectures=["GPT2LMHeadModel"])
    if name == "bert-base-uncased":
        return BertConfig(architectures=["BertForMaskedLM"])
    raise DataError(f"unknown architecture 'config:{name}'; known: {', '.join('config:' + k for k in KNOWN_CONFIGS)}, "
                    "or config:PATH to a config.json")


def load_config(src: str | os.PathLike, *, trust_remote_code: bool = False):
    """The transformers config of a model source (see the module docstring); nothing else is loaded."""
    from transformers import AutoConfig

    text = resolve_source(src)
    if text.startswith("config:"):
        spec = text[len("config:"):]
        if spec in KNOWN_CONFIGS:
            return _known_config(spec)
        path = Path(spec).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            if "/" in spec or spec.endswith(".json") or os.sep in spec:
                raise DataError(f"config file {path} does not exist")
            return _known_config(spec)
        try:
            return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot read the model config {path}: {one_line(exc)}") from None
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DataError(f"model source {path} is a file; give the model directory (with config.json), or "
                            f"config:{path} for an architecture with random weights")
        if not (path / "config.json").is_file():
            raise CheckpointError(f"model directory {path} has no config.json")
        try:
            return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot read {path / 'config.json'}: {one_line(exc)}") from None
    _check_hub_name(text)
    try:
        return AutoConfig.from_pretrained(text, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise CheckpointError(_hub_failure(text, exc)) from None


def _check_hub_name(text: str) -> None:
    looks_local = text.startswith((".", "/", "~")) or text.endswith((".json", ".safetensors", ".bin")) \
        or text.count("/") > 1 or (os.sep != "/" and os.sep in text)
    if looks_local or not _HUB_NAME.match(text):
        raise DataError(f"model source {text} does not exist (not a local directory, and not a hub name like "
                        "'openai-community/gpt2'); or use config:gpt2 / config:bert-base-uncased / config:PATH")


def _hub_failure(name: str, exc: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") or \
        os.environ.get("TRANSFORMERS_OFFLINE") in ("1", "true", "True")
    why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else one_line(exc)
    return (f"cannot load {name!r}: no local directory of that name, and the Hugging Face Hub lookup failed ({why}); "
            "give a local model directory, a reachable hub name, or config:gpt2 / config:bert-base-uncased")


# ----------------------------------------------------------------------------------------------- models


def task_of(config) -> str:
    """causal-lm / sequence-classification / base from config.architectures."""
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith(("LMHeadModel", "ForCausalLM")):
            return "causal-lm"
        if arch.endswith("ForSequenceClassification"):
            return "sequence-classification"
    return "base"


def _auto_class(task: str):
    import transformers

    return {
        "causal-lm": transformers.AutoModelForCausalLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "base": transformers.AutoModel,
    }[task]


def _resolve_task(task: str, config) -> str:
    if task not in TASKS:
        raise ConfigError(f"task {task!r} is not supported; use one of {', '.join(TASKS)}")
    return task_of(config) if task == "auto" else task


def build_from_config(config, *, task: str = "auto", seed: int = 0, device=None, dtype=None,
                      attn_implementation: str | None = "eager", trust_remote_code: bool = False) -> nn.Module:
    """A model of the config's architecture with random weights drawn under `torch.manual_seed(seed)`.

    device "meta" builds the structure only (no memory, no initialisation): enough to count parameters and
    resolve plans.
    """
    task = _resolve_task(task, config)
    dtype = parse_dtype(dtype)
    device = pick_device(device)
    kwargs = {"trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs["dtype"] = dtype
    cls = _auto_class(task)
    if device.type == "meta":
        with torch.device("meta"):
            model = cls.from_config(config, **kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls.from_config(config, **kwargs)
        model.to(device)
    return model.eval()


def load_model(src: str | os.PathLike, *, task: str = "auto", num_labels: int | None = None, device=None,
               dtype=None, trust_remote_code: bool = False, attn_implementation: str | None = None,
               seed: int = 0) -> nn.Module:
    """Load a model to compress, in eval mode.

    Args:
        src: a local model directory, a hub name, config:gpt2 / config:bert-base-uncased / config:PATH (random
            weights), or a directory written by save_compressed.
        task: "auto" (from config.architectures: ...LMHeadModel/...ForCausalLM -> causal-lm,
            ...ForSequenceClassification -> sequence-classification, else base), or one of those three.
        num_labels: classification labels (a new head is initialised when it differs from the checkpoint's).
        device: "auto"/None (cuda when available), "cpu", "cuda:N", or "meta" (structure only, config sources).
        dtype: None (the checkpoint's), a torch.dtype, or a name such as "bfloat16".
        attn_implementation: passed to transformers ("eager" is used for config: sources when None).
        seed: for the random weights of config: sources.
    Local weights are read with safetensors only (a pickle can run code when loaded).
    """
    text = resolve_source(src)
    dtype = parse_dtype(dtype)
    if not text.startswith("config:"):
        path = Path(text).expanduser()
        if path.is_dir() and (path / "kronsearch.json").is_file():
            from .io import load_compressed

            return load_compressed(path, device=device, dtype=dtype)
    config = load_config(text, trust_remote_code=trust_remote_code)
    if num_labels is not None:
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ConfigError(f"num_labels must be a positive integer, got {num_labels!r}")
        config.num_labels = num_labels
    task = _resolve_task(task, config)
    if text.startswith("config:"):
        return build_from_config(config, task=task, seed=seed, device=device, dtype=dtype,
                                 attn_implementation=attn_implementation or "eager",
                                 trust_remote_code=trust_remote_code)
    device = pick_device(device)
    path = Path(text).expanduser()
    local = path.is_dir()
    if local:
        check_weights(path)
    kwargs = {"config": config, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if num_labels is not None:
        kwargs["ignore_mismatched_sizes"] = True  # a new classification head of the requested size
    cls = _auto_class(task)
    from safetensors import SafetensorError

    try:
        model = cls.from_pretrained(str(path) if local else text, **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:  # SafetensorError: a truncated or corrupt weights file
        if local and isinstance(exc, SafetensorError):
            weights = next((path / f for f in _WEIGHT_FILES if (path / f).is_file()), path)
            raise CheckpointError(f"cannot load the model in {path}: {weights} is truncated or corrupt "
                                  f"({one_line(exc)})") from None
        if local:
            raise CheckpointError(f"cannot load the model in {path}: {one_line(exc)}") from None
        raise CheckpointError(_hub_failure(text, exc)) from None
    return model.to(device).eval()


def check_weights(path: Path) -> None:
    """CheckpointError unless a model directory holds safetensors weights (pickled ones are refused)."""
    if any((path / f).is_file() for f in _WEIGHT_FILES):
        return
    pickles = [f for f in _PICKLE_FILES if (path / f).is_file()]
    if pickles:
        raise CheckpointError(
            f"model directory {path} has only {pickles[0]}; kronsearch reads safetensors only (unpickling can run "
            "code). Convert it once where you trust the file: load it with transformers' from_pretrained and call "
            "save_pretrained(DIR), which writes model.safetensors"
        )
    raise CheckpointError(f"model directory {path} has no weights (expected {' or '.join(_WEIGHT_FILES)}); for "
                          f"random weights use config:{path / 'config.json'}")


def load_tokenizer(src: str | os.PathLike, *, trust_remote_code: bool = False):
    """The tokenizer stored with a model source (a local directory or a hub name)."""
    from transformers import AutoTokenizer

    text = resolve_source(src)
    if text.startswith("config:"):
        raise DataError(f"{text} is an architecture without a tokenizer; give a model directory or hub name")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DataError(f"tokenizer source {path} is not a directory")
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise DataError(f"{path} has no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)})")
    else:
        _check_hub_name(text)
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else text, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load a tokenizer from {text}: {one_line(exc)}") from None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                    "merges.txt", "special_tokens_map.json")


def is_causal_lm(model) -> bool:
    """Whether `model` is a causal LM with an output embedding (a ...LMHeadModel / ...ForCausalLM)."""
    return hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None and (
        type(model).__name__.endswith(("LMHeadModel", "ForCausalLM"))
    )


def max_positions(model) -> int | None:
    """The positions the model's config allows (GPT-2's n_positions, others' max_position_embeddings), or None."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
