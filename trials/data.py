"""Causal-LM text data: token blocks from local files or the datasets hub, and data-free teacher samples.

`load_text_blocks` turns a corpus into a (num_blocks, seq_len) LongTensor: every non-blank line (or "text"
record) is tokenised, followed by the tokenizer's EOS, all of it concatenated and cut into blocks, the
remainder dropped. The ids are cached on disk, keyed by the source files (path, size, mtime), the tokenizer,
seq_len and split, so a second run starts instantly.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from kron.errors import ConfigError, DataError

if TYPE_CHECKING:  # torch is imported lazily so that `import trials.data` stays cheap
    import torch

SPLITS = ("train", "valid", "test")
# Names a split may go by, in files and on the hub.
_SPLIT_ALIASES = {
    "train": ("train",),
    "valid": ("valid", "validation", "val", "dev"),
    "test": ("test",),
}
_TEXT_SUFFIXES = (".txt", ".raw", ".tokens", ".jsonl", ".json", ".parquet")
_TOKENIZE_BATCH = 1000


def default_cache_dir() -> Path:
    """`$KRONSEARCH_CACHE`, or `~/.cache/kronsearch`."""
    env = os.environ.get("KRONSEARCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kronsearch"


def canonical_split(split: str) -> str:
    """Map a split alias ("validation", "dev", ...) to one of train/valid/test."""
    s = str(split).strip().lower()
    for name, aliases in _SPLIT_ALIASES.items():
        if s in aliases:
            return name
    raise ConfigError(f"unknown split {split!r}; valid: train, valid (validation, val, dev), test")


# ----------------------------------------------------------------------------------------------- sources


def _candidate_names(split: str) -> list[str]:
    names = []
    for alias in _SPLIT_ALIASES[split]:
        for suffix in (".txt", ".jsonl", ".json", ".parquet", ".raw", ".tokens"):
            names.append(alias + suffix)
        # WikiText's own release names: wiki.train.raw, wiki.valid.tokens
        names += [f"wiki.{alias}.raw", f"wiki.{alias}.tokens", f"wiki.{alias}.txt"]
    return names


def resolve_split_file(directory: str | os.PathLike, split: str) -> Path:
    """The file holding `split` inside `directory` (train.txt, valid.jsonl, wiki.valid.raw, dev.parquet, ...)."""
    directory = Path(directory)
    split = canonical_split(split)
    names = _candidate_names(split)
    for name in names:
        path = directory / name
        if path.is_file():
            return path
    # also accept HF-style parquet shards such as validation-00000-of-00001.parquet
    for alias in _SPLIT_ALIASES[split]:
        shards = sorted(directory.glob(f"{alias}-*.parquet"))
        if shards:
            return shards[0]
    raise DataError(
        f"no {split!r} split in directory {directory}: looked for {', '.join(names)} "
        f"(and {'/'.join(_SPLIT_ALIASES[split])}-*.parquet)"
    )


def _looks_like_hub_name(source: str) -> bool:
    if os.path.isabs(source) or source.startswith((".", "~")) or source.endswith(_TEXT_SUFFIXES):
        return False
    parts = source.split("/")
    return 1 <= len(parts) <= 2 and all(parts)


def read_local_texts(path: Path, cache_dir: Path, builder: str | None = None) -> list[str]:
    """Records of one local file, via the `datasets` builders (text lines, json "text" field, parquet column);
    `builder` (text, json, parquet) overrides the one the suffix picks."""
    import datasets

    suffix = path.suffix.lower()
    builder = builder or {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix, "text")
    try:
        ds = datasets.load_dataset(
            builder, data_files={"data": str(path)}, split="data", cache_dir=str(cache_dir / "hf_datasets")
        )
    except Exception as exc:  # malformed json/parquet: say which file
        raise DataError(f"could not read {path} as {builder}: {type(exc).__name__}: {exc}") from exc
    if "text" not in ds.column_names:
        raise DataError(f"{path} has no 'text' field/column (found: {', '.join(ds.column_names)})")
    return [t for t in ds["text"] if t is not None]


def _read_hub_texts(name: str, config_name: str | None, split: str, cache_dir: Path) -> list[str]:
    import datasets

    errors = []
    hub_splits = ("validation", "valid", "dev") if split == "valid" else (split,)
    for hub_split in hub_splits:  # the hub's usual name first, then the others some datasets use
        try:
            ds = datasets.load_dataset(name, config_name, split=hub_split, cache_dir=str(cache_dir / "hf_datasets"))
        except ValueError as exc:  # unknown split name: try the next alias
            errors.append(f"{hub_split}: {exc}")
            continue
        except Exception as exc:
            raise DataError(
                f"{name!r} is not a local path and could not be loaded from the datasets hub "
                f"(config {config_name!r}, split {hub_split!r}): {type(exc).__name__}: {exc}"
            ) from exc
        if "text" not in ds.column_names:
            raise DataError(f"hub dataset {name!r} has no 'text' column (found: {', '.join(ds.column_names)})")
        return [t for t in ds["text"] if t is not None]
    raise DataError(f"hub dataset {name!r} (config {config_name!r}) has no {split!r} split: {'; '.join(errors)}")


def local_source_file(source: str | os.PathLike, split: str) -> Path | None:
    """The local file behind (source, split); None when `source` is a hub name. Missing paths raise DataError."""
    path = Path(source).expanduser()
    if path.is_dir():
        return resolve_split_file(path, split)
    if path.is_file():
        return path  # a single file is the whole corpus, whatever the split
    if isinstance(source, os.PathLike) or not _looks_like_hub_name(str(source)):
        raise DataError(f"data source {path} does not exist (expected a text/jsonl/parquet file or a directory)")
    return None


def iter_texts(
    source: str | os.PathLike,
    split: str = "train",
    *,
    config_name: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[str]:
    """The non-blank text records (lines or documents) of one split of `source`."""
    split = canonical_split(split)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    local = local_source_file(source, split)
    texts = read_local_texts(local, cache) if local else _read_hub_texts(str(source), config_name, split, cache)
    return [t.strip() for t in texts if t and t.strip()]


# ------------------------------------------------------------------------------------------- tokenising


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what the tokenizer maps text to: name, size, vocabulary, special tokens."""
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256()
    h.update(f"{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}|{type(tokenizer).__name__}".encode())
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update(f"|eos={eos_id(tokenizer)}".encode())
    return h.hexdigest()[:16]


def eos_id(tokenizer) -> int | None:
    """The separator appended after each document: EOS, else SEP (BERT-style), else None."""
    for attr in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return None


def tokenize_texts(texts: Iterable[str], tokenizer, *, max_tokens: int | None = None) -> np.ndarray:
    """Concatenated ids of `texts`, each followed by the EOS id; stops early once `max_tokens` is reached."""
    texts = list(texts)
    sep = eos_id(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    chunks: list[np.ndarray] = []
    total = 0
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        batch = texts[start : start + _TOKENIZE_BATCH]
        if backend is not None:  # the Rust tokenizer directly: faster, and no "sequence too long" warnings
            encoded = [e.ids for e in backend.encode_batch(batch, add_special_tokens=False)]
        else:
            encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        flat = [i for ids in encoded for i in (ids + [sep] if sep is not None else ids)]
        chunks.append(np.asarray(flat, dtype=np.int64))
        total += len(flat)
        if max_tokens is not None and total >= max_tokens:
            break
    ids = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    return ids[:max_tokens] if max_tokens is not None else ids


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)  # readers see either no file or a complete one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _source_key(source, split: str, config_name: str | None) -> dict:
    local = local_source_file(source, split)
    if local is None:
        return {"hub": str(source), "config": config_name, "split": split}
    st = local.stat()
    return {"path": str(local.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "split": split}


def load_text_blocks(
    source: str | os.PathLike,
    tokenizer,
    seq_len: int,
    split: str = "train",
    *,
    config_name: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_tokens: int | None = None,
) -> "torch.Tensor":
    """Token blocks (num_blocks, seq_len) of one split of a text corpus, cached on disk.

    `source`: a .txt (one record per line) / .jsonl ("text" field) / .parquet ("text" column) file, a directory
    with train/valid/test files (train.txt, wiki.valid.raw, validation.jsonl, dev.parquet, ...), or a datasets
    hub name such as "wikitext" with `config_name="wikitext-103-raw-v1"` (needs network).
    """
    import torch

    if int(seq_len) < 1:
        raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
    seq_len = int(seq_len)
    split = canonical_split(split)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = {
        "source": _source_key(source, split, config_name),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "seq_len": seq_len,
        "max_tokens": max_tokens,
        "format": 1,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    cache_file = cache / "text_blocks" / f"{split}-{seq_len}-{digest}.npy"
    if cache_file.is_file():
        try:
            cached = np.load(cache_file)  # allow_pickle stays False: a cache file cannot run code
            if cached.ndim != 2 or cached.shape[1] != seq_len or cached.shape[0] < 1:
                raise ValueError(f"cached blocks have shape {cached.shape}, expected (n, {seq_len})")
            return torch.from_numpy(cached.astype(np.int64))
        except (ValueError, OSError, EOFError):  # a corrupt cache is rebuilt, not fatal
            cache_file.unlink(missing_ok=True)

    texts = iter_texts(source, split, config_name=config_name, cache_dir=cache)
    ids = tokenize_texts(texts, tokenizer, max_tokens=max_tokens)
    num_blocks = len(ids) // seq_len
    if num_blocks == 0:
        raise DataError(
            f"split {split!r} of {source} has {len(ids)} tokens, fewer than one block of seq_len={seq_len}"
        )
    blocks = ids[: num_blocks * seq_len].reshape(num_blocks, seq_len)
    dtype = np.int32 if len(tokenizer) < 2**31 else np.int64
    _atomic_save_npy(cache_file, blocks.astype(dtype))
    return torch.from_numpy(blocks)


def lm_batches(
    blocks: "torch.Tensor", batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False
) -> Iterator["torch.Tensor"]:
    """Batches of rows of `blocks`, optionally shuffled with a fixed seed (one pass)."""
    import torch

    n = blocks.shape[0]
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield blocks[order[start : start + batch_size]]


# ------------------------------------------------------------------------------------ data-free samples


def model_fingerprint(model) -> str:
    """Hash of the config plus a few weights: two different teachers never share a sample cache."""
    h = hashlib.sha256()
    h.update(getattr(model.config, "name_or_path", "").encode())
    h.update(model.config.to_json_string(use_diff=False).encode())
    params = list(model.parameters())
    for p in params[:2] + params[-2:]:
        h.update(p.detach().float().cpu().flatten()[:4096].numpy().tobytes())
    return h.hexdigest()[:16]


def sample_teacher_text(
    model,
    tokenizer,
    num_sequences: int,
    seq_len: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = 50,
    seed: int = 0,
    cache_path: str | os.PathLike | None = None,
    device=None,
    batch_size: int = 32,
) -> "torch.Tensor":
    """Data-free text: `num_sequences` rows of `seq_len` ids sampled from a causal-LM teacher.

    Every row starts with the BOS token (EOS when the tokenizer has no BOS) followed by seq_len - 1 sampled
    tokens. The result is cached at `cache_path` (default: a file in the cache dir keyed by the model, the
    tokenizer and the sampling settings) and reused when that cache exists with the same settings.
    """
    import torch
    from safetensors.torch import load_file, save_file

    if num_sequences < 1 or seq_len < 2:
        raise ConfigError(f"need num_sequences >= 1 and seq_len >= 2, got {num_sequences} and {seq_len}")
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    from kron.models import max_positions

    max_pos = max_positions(model)
    if max_pos is not None and seq_len > max_pos:
        raise ConfigError(f"seq_len={seq_len} is longer than the model's {max_pos} positions")
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos_id(tokenizer)
    if start_id is None:
        raise ConfigError("the tokenizer has neither a BOS nor an EOS token to start sampling from")

    settings = {
        "model": model_fingerprint(model),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "num_sequences": str(num_sequences),
        "seq_len": str(seq_len),
        "temperature": repr(float(temperature)),
        "top_k": str(top_k),
        "seed": str(seed),
    }
    if cache_path is None:
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
        cache_path = default_cache_dir() / "teacher_samples" / f"{digest}.safetensors"
    cache_path = Path(cache_path)
    if cache_path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(cache_path), framework="pt") as f:
                meta = f.metadata() or {}
            if all(meta.get(k) == v for k, v in settings.items()):
                cached = load_file(str(cache_path))["ids"].long()
                if tuple(cached.shape) == (num_sequences, seq_len):  # else a damaged cache: sample again
                    return cached
        except Exception:  # unreadable cache: sample again and overwrite it
            pass

    device = torch.device(device) if device is not None else next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    # transformers >= 5.25 calls the KV cache `cache` (passing `past_key_values` prints a FutureWarning per run)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    was_training = model.training
    model.eval()
    rows = []
    with torch.no_grad():
        for start in range(0, num_sequences, batch_size):
            n = min(batch_size, num_sequences - start)
            ids = torch.full((n, 1), start_id, dtype=torch.long, device=device)
            past = None
            for _ in range(seq_len - 1):
                cache = {} if past is None else {cache_arg: past}
                out = model(input_ids=ids if past is None else ids[:, -1:], use_cache=True, **cache)
                past = out[cache_arg] if cache_arg in out else out.past_key_values
                logits = out.logits[:, -1, :].float() / temperature
                if top_k:
                    kth = torch.topk(logits, min(int(top_k), logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)
                ids = torch.cat([ids, nxt], dim=1)
            rows.append(ids.cpu())
    model.train(was_training)
    samples = torch.cat(rows)

    cache_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_path.parent, prefix=cache_path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file({"ids": samples.to(torch.int32 if len(tokenizer) < 2**31 else torch.int64)}, tmp, metadata=settings)
        os.replace(tmp, cache_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return samples
