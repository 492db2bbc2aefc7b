"""Calibration data for data-aware init: a trial data source and a token budget -> `kron.calibration.CalibStats`.

`calibration_stats(teacher, tokenizer, source, tokens=...)` builds token batches from any trial data source and runs
`kron.calibration.collect_input_stats` over them, caching the statistics on disk (one safetensors file per matrix
under `$KRONSEARCH_CACHE/calibration/<key>/`) keyed by the teacher (config and weights fingerprint), the data source
(path, size, mtime; hub name; GLUE task; sampling settings), the tokenizer, the budget and the sequence length.

Sources: a text file or folder (its train split), a datasets-hub name (with `config_name`), `glue:<task>` or
`glue:<task>:<dir>` (the task's training sentences, padded batches), or `teacher-samples` (text sampled from a
causal-LM teacher). The last 1/8 of the budget is held out: the compress report's output error is measured there.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from kron.errors import ConfigError, DataError

__all__ = ["DEFAULT_CALIB_TOKENS", "HELDOUT_FRACTION", "calibration_batches", "calibration_stats",
           "describe_source"]

DEFAULT_CALIB_TOKENS = 8192
HELDOUT_FRACTION = 0.125
TEACHER_SAMPLES = "teacher-samples"
_FORMAT = 1
_BATCH = 8


def describe_source(source: str, config_name: str | None = None) -> dict:
    """What identifies a calibration source in the cache key (local files by path, size and mtime)."""
    from .data import local_source_file

    if source == TEACHER_SAMPLES:
        return {"teacher_samples": True}
    if source.startswith("glue:"):
        _, _, rest = source.partition(":")
        task, _, folder = rest.partition(":")
        out = {"glue": task}
        if folder:
            p = Path(folder).expanduser()
            if not p.is_dir():
                raise DataError(f"calibration source {source}: GLUE data directory {p} does not exist")
            out["dir"] = str(p.resolve())
        return out
    local = local_source_file(source, "train")  # DataError when a path does not exist
    if local is None:
        return {"hub": source, "config": config_name}
    st = local.stat()
    return {"path": str(local.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _split_blocks(blocks, tokens: int, seq_len: int, what: str):
    """(fit batches, held-out batches) of (batch, seq_len) blocks for a budget of `tokens`."""
    need = math.ceil(tokens / seq_len)
    have = blocks.shape[0]
    if have < need:
        raise DataError(f"calibration source {what} has {have * seq_len:,} tokens ({have} blocks of {seq_len}), fewer "
                        f"than the {tokens:,} asked for (calib_tokens / --calib-tokens); give a larger source or a "
                        f"budget of at most {have * seq_len:,}")
    blocks = blocks[:need]
    held = max(1, round(need * HELDOUT_FRACTION))
    fit, heldout = blocks[: need - held], blocks[need - held:]
    return list(fit.split(_BATCH)), list(heldout.split(_BATCH))


def _glue_batches(source: str, tokenizer, tokens: int, max_len: int):
    import torch

    from .glue import encode_glue, get_task, load_glue

    _, _, rest = source.partition(":")
    task, _, folder = rest.partition(":")
    if not task:
        raise ConfigError(f"calibration source {source!r}: name a GLUE task, e.g. glue:sst2 or glue:sst2:PATH")
    spec = get_task(task)
    examples = load_glue(spec, folder or "glue", "train")
    enc = encode_glue(examples[: max(64, tokens // 2)], tokenizer, max_len)
    mask = enc["attention_mask"]
    lengths = mask.sum(1)
    total = int(lengths.sum().item())
    if total < tokens:
        raise DataError(f"calibration source {source} has {total:,} tokens in its first {mask.shape[0]} sentences, "
                        f"fewer than the {tokens:,} asked for (calib_tokens / --calib-tokens); give a smaller budget")
    cum = torch.cumsum(lengths, 0)
    n = int(torch.searchsorted(cum, torch.tensor(tokens)).item()) + 1
    held_n = max(1, round(n * HELDOUT_FRACTION))
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]

    def batches(lo: int, hi: int):
        out = []
        for s in range(lo, hi, _BATCH * 4):
            e = min(hi, s + _BATCH * 4)
            width = int(lengths[s:e].max().item())
            out.append({k: enc[k][s:e, :width] for k in keys})
        return out

    return batches(0, n - held_n), batches(n - held_n, n)


def calibration_batches(teacher, tokenizer, source: str, tokens: int = DEFAULT_CALIB_TOKENS, *, seq_len: int = 128,
                        config_name: str | None = None, temperature: float = 1.0, top_k: int | None = 50,
                        device=None):
    """(fit batches, held-out batches) for a data source and a token budget (see the module docstring)."""
    from . import data as data_mod

    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ConfigError(f"calib_tokens must be a positive integer, got {tokens!r}")
    from kron.models import max_positions

    max_pos = max_positions(teacher)
    if max_pos is not None:
        seq_len = min(seq_len, max_pos)
    if source.startswith("glue:"):
        return _glue_batches(source, tokenizer, tokens, min(seq_len, max_pos or seq_len))
    if tokens < 2 * seq_len:
        raise ConfigError(f"calib_tokens {tokens:,} is below two blocks of {seq_len} tokens (one to fit, one held "
                          f"out); give at least {2 * seq_len:,}")
    if source == TEACHER_SAMPLES:
        if not (hasattr(teacher, "get_output_embeddings") and teacher.get_output_embeddings() is not None):
            raise DataError("calibration source 'teacher-samples' needs a causal-LM teacher; give a text corpus")
        blocks = data_mod.sample_teacher_text(teacher, tokenizer, math.ceil(tokens / seq_len), seq_len, seed=2,
                                              temperature=temperature, top_k=top_k, device=device)
    else:
        blocks = data_mod.load_text_blocks(source, tokenizer, seq_len, "train", config_name=config_name,
                                           max_tokens=tokens)
    return _split_blocks(blocks, tokens, seq_len, source)


def calibration_stats(teacher, tokenizer, source: str, tokens: int = DEFAULT_CALIB_TOKENS, *, seq_len: int = 128,
                      config_name: str | None = None, temperature: float = 1.0, top_k: int | None = 50,
                      model_id: str | None = None, cache_dir: str | os.PathLike | None = None, device=None):
    """The teacher's calibration statistics (`kron.calibration.CalibStats`) on `tokens` tokens of `source`, from
    the disk cache when the same model, data, budget and sequence length were collected before."""
    from kron.calibration import CalibStats, collect_input_stats

    from .data import model_fingerprint, default_cache_dir, tokenizer_fingerprint

    source = str(source)
    if not source.strip():
        raise ConfigError("the calibration source is empty: give a text file or folder, a hub dataset, "
                          "glue:<task>[:dir] or teacher-samples")
    key = {
        "format": _FORMAT,
        "model": model_id or "",
        "fingerprint": model_fingerprint(teacher),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "source": describe_source(source, config_name),
        "tokens": int(tokens),
        "seq_len": int(seq_len),
        "heldout_fraction": HELDOUT_FRACTION,
    }
    if source == TEACHER_SAMPLES:
        key["sampling"] = {"temperature": float(temperature), "top_k": top_k}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "calibration" / digest
    if (folder / "calib.json").is_file():
        try:
            stats = CalibStats.load(folder)
            if stats.key == key:
                stats.from_cache = True
                return stats
        except DataError:
            pass  # damaged: collect again
    fit, heldout = calibration_batches(teacher, tokenizer, source, tokens, seq_len=seq_len, config_name=config_name,
                                       temperature=temperature, top_k=top_k, device=device)
    return collect_input_stats(teacher, fit, heldout=heldout, cache_dir=folder, key=key, device=device)


def trial_calibration(cfg, teacher, tokenizer=None):
    """The calibration statistics a trial's `init: data` asks for (None for `init: svd`): its `calib` source, or
    its default source (`default_calib_source`)."""
    if cfg.init_config.method != "data":
        return None
    return calibration_for(cfg, teacher, tokenizer)


def default_calib_source(cfg) -> tuple[str, int]:
    """(source, sequence length) a trial calibrates on when `init.calib` is not given: its stage-1 data, or for a
    GLUE-only trial (no stage 1) the task's training sentences ("glue:TASK:SOURCE")."""
    if cfg.stage1 is None and cfg.glue is not None:
        return f"glue:{cfg.glue.task}:{cfg.glue.source}", cfg.glue.max_len
    return cfg.data.source, cfg.data.seq_len


def _calib_call(cfg, teacher, tokenizer, tokens: int | None):
    """(teacher, tokenizer, source, tokens) and the keyword arguments with which `calibration_batches` and
    `calibration_stats` read a trial config's calibration data: `init.calib` (else `default_calib_source`), a budget
    of `tokens` (default `init.calib_tokens`)."""
    from kron.models import load_tokenizer, resolve_source

    init = cfg.init_config
    d = cfg.data
    default, seq_len = default_calib_source(cfg)
    source = init.calib if init.calib is not None else default
    config_name = init.calib_config_name if init.calib_config_name is not None else (
        d.config_name if source == d.source else None)
    if tokenizer is None:
        tokenizer = load_tokenizer(resolve_source(cfg.teacher), trust_remote_code=cfg.trust_remote_code)
    return ((teacher, tokenizer, source, tokens or init.calib_tokens),
            {"seq_len": seq_len, "config_name": config_name, "temperature": d.temperature, "top_k": d.top_k or None,
             "device": next(teacher.parameters()).device})


def heldout_for(cfg, teacher, tokenizer=None, tokens: int | None = None):
    """The held-out calibration batches of a trial config's calibration source and budget (the part of
    `calibration_batches` that `calibration_for`'s statistics leave out), for model-level measures."""
    args, kw = _calib_call(cfg, teacher, tokenizer, tokens)
    return calibration_batches(*args, **kw)[1]


def calibration_for(cfg, teacher, tokenizer=None, tokens: int | None = None):
    """The calibration statistics of a trial config's calibration source (`init.calib`, else
    `default_calib_source`) on `teacher`, with a budget of `tokens` (default `init.calib_tokens`); cached on disk."""
    args, kw = _calib_call(cfg, teacher, tokenizer, tokens)
    return calibration_stats(*args, **kw, model_id=cfg.teacher)
