"""Perplexity the way papers measure it: the GPTQ / SparseGPT convention (`kronsearch eval --protocol gptq`).

GPTQ's `datautils.py` and every post-training compression paper since (SparseGPT, SliceGPT, SVD-LLM, EvoPress)
report WikiText-2 perplexity as follows, and so does this module:

- the rows of the raw test split (`wikitext-2-raw-v1`) are joined with "\\n\\n" into one string and tokenised as
  one stream (with the tokenizer's default special tokens: Llama's BOS once at the start, nothing for GPT-2);
- the stream is cut into non-overlapping windows of `seq_len` tokens (the model's context, at most 2,048), the
  tail that does not fill a window is dropped; stride = `seq_len`, so every window starts from an empty context;
- perplexity = exp(mean next-token NLL over every predicted token of every window) (`seq_len - 1` per window).

C4 follows the same code path with GPTQ's settings: the first 1,100 documents of the en validation shard
`c4-validation.00000-of-00008.json.gz`, joined with a space, the first 256 windows.

A local raw WikiText file gives the same rows as the hub dataset: each line with its newline, a whitespace-only
line as "" (what the hub's `wikitext` builder yields), so the joined text is the same string.

Not the same number as `--protocol blocks` (the project's training/search perplexity: non-blank lines stripped,
EOS after each, blocks of the trial's `seq_len`), nor lm-eval's `wikitext` task (document-level rolling word
perplexity). The output always says which protocol, context, stride and number of windows gave a number.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kron.errors import ConfigError, DataError

MAX_CONTEXT = 2048  # the convention's window for Llama-family models; longer contexts are cut to it


@dataclass(frozen=True)
class Corpus:
    """One evaluation corpus of the convention: where its rows come from and how they are joined and cut."""

    name: str
    hub: tuple[str, str | None, str]  # (dataset, config, split) on the datasets hub
    hub_files: dict | None  # data_files for the hub load (C4's validation shard), or None
    joiner: str
    max_rows: int | None  # rows taken from the start (C4: 1,100 documents)
    max_windows: int | None  # windows evaluated (C4: 256)


CORPORA: dict[str, Corpus] = {
    "wikitext2": Corpus("wikitext2", ("wikitext", "wikitext-2-raw-v1", "test"), None, "\n\n", None, None),
    "c4": Corpus("c4", ("allenai/c4", None, "validation"),
                 {"validation": "en/c4-validation.00000-of-00008.json.gz"}, " ", 1100, 256),
}


def parse_source(spec: str | None) -> tuple[Corpus, str | None]:
    """`wikitext2`, `c4` (hub), `wikitext2:PATH`, `c4:PATH`, or a bare PATH (WikiText convention)."""
    if spec is None or spec == "":
        return CORPORA["wikitext2"], None
    name, sep, path = spec.partition(":")
    if sep and name in CORPORA:
        if not path:
            raise ConfigError(f"--data {spec!r}: give a path after '{name}:'")
        return CORPORA[name], path
    if spec in CORPORA:
        return CORPORA[spec], None
    if not Path(spec).expanduser().exists():
        raise DataError(f"--data {spec!r} is neither a corpus of the gptq protocol ({', '.join(CORPORA)}, "
                        f"optionally NAME:PATH) nor an existing file or folder")
    return CORPORA["wikitext2"], spec


def raw_rows(path: str | os.PathLike) -> list[str]:
    """Rows of a raw text file as the hub's `wikitext` builder yields them: every line with its newline kept, a
    whitespace-only line as ""."""
    with open(path, encoding="utf-8", newline="") as f:
        return [line if line.strip() else "" for line in f]


def load_rows(corpus: Corpus, path: str | None, split: str = "test") -> tuple[list[str], str]:
    """The corpus's rows (capped by `max_rows`) and a description of where they came from."""
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            from .data import resolve_split_file

            p = resolve_split_file(p, split)
        if not p.is_file():
            raise DataError(f"{p} does not exist")
        if p.name.lower().endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):  # C4's shards: "text" records
            from .data import default_cache_dir, read_local_texts

            rows = read_local_texts(p, default_cache_dir(), builder="json")
        else:
            rows = raw_rows(p)
        where = str(p)
    else:
        import datasets

        dataset, config, hub_split = corpus.hub
        try:
            ds = datasets.load_dataset(dataset, config, data_files=corpus.hub_files, split=hub_split)
        except Exception as exc:
            raise DataError(f"could not load {dataset} ({config or 'default'}, {hub_split}) from the datasets hub "
                            f"or its cache: {type(exc).__name__}: {exc}; give a local file as "
                            f"--data {corpus.name}:PATH") from exc
        rows, where = list(ds["text"]), f"hub:{dataset}" + (f"/{config}" if config else "") + f":{hub_split}"
    if corpus.max_rows is not None:
        rows = rows[: corpus.max_rows]
    if not any(r.strip() for r in rows):
        raise DataError(f"{where} has no text")
    return rows, where


def token_stream(rows: list[str], joiner: str, tokenizer):
    """The rows joined and tokenised as one stream: a 1-D LongTensor."""
    import torch

    text = joiner.join(rows)
    ids = tokenizer(text, verbose=False)["input_ids"]  # one call: the stream, not per-row encodings
    return torch.tensor(ids, dtype=torch.long)


def windows(ids, seq_len: int, max_windows: int | None = None):
    """(n, seq_len) non-overlapping windows from the start of the stream; the tail that does not fill one dropped."""
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"the token stream has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def default_seq_len(model) -> int:
    """The model's context, at most MAX_CONTEXT."""
    from kron.models import max_positions

    ctx = max_positions(model)
    return min(int(ctx), MAX_CONTEXT) if ctx else MAX_CONTEXT


def check_seq_len(model, seq_len: int) -> None:
    from kron.models import max_positions

    ctx = max_positions(model)
    if seq_len < 2:
        raise ConfigError(f"--seq-len must be >= 2, got {seq_len}")
    if ctx and seq_len > ctx:
        raise ConfigError(f"--seq-len {seq_len} is longer than the model's context ({ctx} positions)")


def evaluate_gptq(model, tokenizer, data: str | None, *, seq_len: int | None, batch_size: int, device,
                  split: str = "test", max_windows: int | None = None) -> dict:
    """`kronsearch eval --protocol gptq`: the corpus, the stream, the windows and the number, all stated."""
    corpus, path = parse_source(data)
    seq_len = seq_len or default_seq_len(model)
    check_seq_len(model, seq_len)
    rows, where = load_rows(corpus, path, split)
    ids = token_stream(rows, corpus.joiner, tokenizer)
    caps = [c for c in (corpus.max_windows, max_windows) if c is not None]
    wins = windows(ids, seq_len, min(caps) if caps else None)
    from .evaluate import evaluate_lm

    m = evaluate_lm(model, wins, batch_size, device)  # exp(mean NLL over every predicted token of every window)
    return {"protocol": "gptq", "corpus": corpus.name, "source": where, "rows": len(rows),
            "joiner": corpus.joiner, "stream_tokens": int(ids.numel()), "context": seq_len, "stride": seq_len,
            "windows": int(wins.shape[0]), "unused_tokens": int(ids.numel() - wins.numel()),
            "perplexity": m["quality"], "nll": m["val_nll"], "predicted_tokens": int(wins[:, 1:].numel()),
            "throughput_tokens_per_s": m["throughput_tokens_per_s"]}
