"""trials.data: text blocks from local files, the token cache, missing-path errors, data-free samples."""
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from kron.errors import ConfigError, DataError
from trials import data as tdata
from trials.data import iter_texts, lm_batches, load_text_blocks, sample_teacher_text

torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"

LINES = [
    "the cat sat on the mat .",
    "",
    " = A heading = ",
    "a dog ran in the park and the cat ran too .",
    "   ",
    "colourless green ideas sleep furiously .",
    "the quick brown fox jumps over the lazy dog .",
]
NONBLANK = [line.strip() for line in LINES if line.strip()]


@pytest.fixture(scope="module")
def tok():
    from trials.teacher import train_bpe_tokenizer

    corpus = NONBLANK * 20 + ["all work and no play makes jack a dull boy ."] * 5
    return train_bpe_tokenizer(corpus, 300, min_frequency=1)


def expected_ids(tok, texts):
    ids = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids


def write_txt(path, lines=LINES):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_txt_blocks_are_lines_plus_eos_cut_into_blocks(tmp_path, tok):
    src = write_txt(tmp_path / "corpus.txt")
    blocks = load_text_blocks(src, tok, 8, cache_dir=tmp_path / "cache")
    ids = expected_ids(tok, NONBLANK)
    n = len(ids) // 8
    assert blocks.dtype == torch.long and blocks.shape == (n, 8)
    assert blocks.flatten().tolist() == ids[: n * 8]
    assert (blocks == tok.eos_token_id).sum() >= 3  # one EOS per non-blank line, none for blank ones


def test_jsonl_and_parquet_match_txt(tmp_path, tok):
    import pandas as pd

    txt = load_text_blocks(write_txt(tmp_path / "c.txt"), tok, 4, cache_dir=tmp_path / "cache")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(LINES)), encoding="utf-8")
    parquet = tmp_path / "c.parquet"
    pd.DataFrame({"text": LINES}).to_parquet(parquet)
    for src in (jsonl, parquet):
        assert torch.equal(load_text_blocks(src, tok, 4, cache_dir=tmp_path / "cache"), txt), src


def test_directory_layouts_and_split_aliases(tmp_path, tok):
    d = tmp_path / "corpus"
    d.mkdir()
    write_txt(d / "train.txt", LINES * 3)
    write_txt(d / "wiki.valid.raw", LINES[:4])
    (d / "test.jsonl").write_text(json.dumps({"text": LINES[5]}) + "\n", encoding="utf-8")
    cache = tmp_path / "cache"
    train = load_text_blocks(d, tok, 4, "train", cache_dir=cache)
    valid = load_text_blocks(d, tok, 4, "validation", cache_dir=cache)
    test = load_text_blocks(str(d), tok, 4, "test", cache_dir=cache)
    assert len(train) == len(expected_ids(tok, NONBLANK * 3)) // 4
    assert valid.flatten().tolist() == expected_ids(tok, NONBLANK[:3])[: valid.numel()]
    assert test.flatten().tolist() == expected_ids(tok, [LINES[5]])[: test.numel()]
    assert torch.equal(load_text_blocks(d, tok, 4, "dev", cache_dir=cache), valid)


def test_cache_is_reused_and_invalidated_when_the_file_changes(tmp_path, tok, monkeypatch):
    src = write_txt(tmp_path / "c.txt")
    cache = tmp_path / "cache"
    first = load_text_blocks(src, tok, 4, cache_dir=cache)
    files = list((cache / "text_blocks").glob("*.npy"))
    assert len(files) == 1 and not list((cache / "text_blocks").glob("*.tmp"))

    def boom(*a, **k):
        raise AssertionError("re-tokenised although a cache exists")

    monkeypatch.setattr(tdata, "tokenize_texts", boom)
    assert torch.equal(load_text_blocks(src, tok, 4, cache_dir=cache), first)
    with pytest.raises(AssertionError, match="re-tokenised"):
        load_text_blocks(src, tok, 5, cache_dir=cache)  # another seq_len is another cache entry
    write_txt(src, LINES + ["one more line of text ."])
    with pytest.raises(AssertionError, match="re-tokenised"):
        load_text_blocks(src, tok, 4, cache_dir=cache)


def test_cache_dir_defaults_to_env(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("KRONSEARCH_CACHE", str(tmp_path / "envcache"))
    load_text_blocks(write_txt(tmp_path / "c.txt"), tok, 4)
    assert list((tmp_path / "envcache" / "text_blocks").glob("*.npy"))


def test_max_tokens_truncates(tmp_path, tok):
    blocks = load_text_blocks(write_txt(tmp_path / "c.txt", LINES * 5), tok, 4, max_tokens=10, cache_dir=tmp_path)
    assert blocks.shape == (2, 4)


def test_missing_paths_raise_data_error_naming_them(tmp_path, tok):
    missing = tmp_path / "nope" / "train.txt"
    with pytest.raises(DataError, match="nope"):
        load_text_blocks(missing, tok, 4, cache_dir=tmp_path)
    with pytest.raises(DataError, match="nope"):
        load_text_blocks(str(missing), tok, 4, cache_dir=tmp_path)
    d = tmp_path / "corpus"
    d.mkdir()
    write_txt(d / "train.txt")
    with pytest.raises(DataError) as err:
        load_text_blocks(d, tok, 4, "test", cache_dir=tmp_path)
    assert str(d) in str(err.value) and "test.txt" in str(err.value) and "wiki.test.raw" in str(err.value)
    with pytest.raises(ConfigError, match="unknown split"):
        load_text_blocks(d, tok, 4, "holdout", cache_dir=tmp_path)


def test_bad_content_raises_data_error(tmp_path, tok):
    bad = tmp_path / "c.jsonl"
    bad.write_text(json.dumps({"body": "no text field"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="'text'"):
        load_text_blocks(bad, tok, 4, cache_dir=tmp_path)
    short = write_txt(tmp_path / "short.txt", ["hi"])
    with pytest.raises(DataError, match="fewer than one block"):
        load_text_blocks(short, tok, 64, cache_dir=tmp_path)


def test_lm_batches():
    blocks = torch.arange(20).reshape(10, 2)
    plain = list(lm_batches(blocks, 4, shuffle=False))
    assert [len(b) for b in plain] == [4, 4, 2] and torch.equal(torch.cat(plain), blocks)
    a = torch.cat(list(lm_batches(blocks, 4, shuffle=True, seed=1)))
    b = torch.cat(list(lm_batches(blocks, 4, shuffle=True, seed=1)))
    assert torch.equal(a, b) and not torch.equal(a, blocks)
    assert sorted(a[:, 0].tolist()) == blocks[:, 0].tolist()
    assert [len(x) for x in lm_batches(blocks, 4, shuffle=True, drop_last=True)] == [4, 4]


@pytest.fixture(scope="module")
def tiny_lm(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    return GPT2LMHeadModel(cfg).eval()


def test_sample_teacher_text_shape_and_cache(tmp_path, tok, tiny_lm, monkeypatch):
    path = tmp_path / "samples.safetensors"
    s = sample_teacher_text(tiny_lm, tok, 5, 12, seed=3, cache_path=path, batch_size=2)
    assert s.shape == (5, 12) and s.dtype == torch.long
    assert (s[:, 0] == tok.bos_token_id).all()
    assert int(s.max()) < len(tok) and path.is_file()

    def boom(*a, **k):
        raise AssertionError("sampled again although the cache exists")

    monkeypatch.setattr(tiny_lm, "forward", boom)
    assert torch.equal(sample_teacher_text(tiny_lm, tok, 5, 12, seed=3, cache_path=path), s)
    with pytest.raises(AssertionError, match="sampled again"):  # other settings do not reuse that cache
        sample_teacher_text(tiny_lm, tok, 5, 12, seed=4, cache_path=path)


def test_sample_teacher_text_kv_cache_matches_full_recompute_without_warnings(tmp_path, tok, tiny_lm):
    """The KV-cached sampler draws the tokens a full recompute of every prefix draws, and passes the cache under
    the name the installed transformers takes (no deprecation warning printed by every search)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        s = sample_teacher_text(tiny_lm, tok, 3, 10, seed=5, top_k=None, cache_path=tmp_path / "s.safetensors")
    gen = torch.Generator().manual_seed(5)
    ids = torch.full((3, 1), tok.bos_token_id, dtype=torch.long)
    with torch.no_grad():
        for _ in range(9):
            logits = tiny_lm(input_ids=ids, use_cache=False).logits[:, -1, :].float()
            ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)], dim=1)
    assert torch.equal(s, ids)


def test_sample_teacher_text_is_seeded_and_default_cached(tmp_path, tok, tiny_lm, monkeypatch):
    monkeypatch.setenv("KRONSEARCH_CACHE", str(tmp_path))
    a = sample_teacher_text(tiny_lm, tok, 3, 8, seed=1, top_k=None)
    assert list((tmp_path / "teacher_samples").glob("*.safetensors"))
    b = sample_teacher_text(tiny_lm, tok, 3, 8, seed=1, top_k=None, cache_path=tmp_path / "b.safetensors")
    c = sample_teacher_text(tiny_lm, tok, 3, 8, seed=2, top_k=None, cache_path=tmp_path / "c.safetensors")
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ConfigError, match="positions"):
        sample_teacher_text(tiny_lm, tok, 1, 64, cache_path=tmp_path / "d.safetensors")


@pytest.mark.shared
def test_real_wikitext2_valid(tmp_path):
    root = SHARED / "wikitext-2"
    if not (root / "valid.txt").is_file():
        pytest.skip(f"shared data not found at {root.resolve()}")
    from transformers import GPT2TokenizerFast

    texts = iter_texts(root, "valid", cache_dir=tmp_path)
    # PROVENANCE.md: 213,886 whitespace tokens in valid.txt; blank lines carry none, so none may be lost
    assert sum(len(t.split()) for t in texts) == 213_886
    assert len(texts) < 3_760  # 3,760 lines, blank ones skipped
    gpt2 = SHARED / "tokenizers" / "gpt2"
    tok = GPT2TokenizerFast.from_pretrained(str(gpt2))  # vocab.json + merges.txt, offline
    assert len(tok) == 50_257
    blocks = load_text_blocks(root, tok, 128, "valid", cache_dir=tmp_path)
    assert blocks.shape[1] == 128 and 1_500 < blocks.shape[0] < 3_000
    assert int(blocks.max()) < 50_257


@pytest.mark.parametrize("name,hub", [
    ("wikitext", True), ("Salesforce/wikitext", True), ("corpus.txt", False), ("./wikitext", False),
    ("/data/wikitext", False), ("a/b/c", False), ("~/wikitext", False), ("data.parquet", False),
])
def test_hub_names_are_told_apart_from_missing_paths(name, hub):
    # a missing local path must fail fast with DataError, never go to the network
    assert tdata._looks_like_hub_name(name) is hub


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong-shape", "pickle"])
def test_a_corrupt_token_cache_is_rebuilt(tmp_path, tok, damage):
    """A truncated, garbled, wrongly shaped or pickled .npy cache is rebuilt from the corpus, never trusted."""
    import numpy as np

    src = write_txt(tmp_path / "c.txt")
    cache = tmp_path / "cache"
    first = load_text_blocks(src, tok, 4, cache_dir=cache)
    (path,) = (cache / "text_blocks").glob("*.npy")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-7])
    elif damage == "garbage":
        path.write_bytes(b"\x93NUMPY garbage" * 3)
    elif damage == "wrong-shape":
        np.save(path, np.arange(10, dtype=np.int64))
    else:
        np.save(path, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    assert torch.equal(load_text_blocks(src, tok, 4, cache_dir=cache), first)
    assert torch.equal(torch.from_numpy(np.load(path)), first)  # rewritten


@pytest.mark.parametrize("damage", ["truncate", "wrong-shape"])
def test_a_corrupt_teacher_sample_cache_is_resampled(tmp_path, tok, tiny_lm, damage):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "samples.safetensors"
    s = sample_teacher_text(tiny_lm, tok, 5, 12, seed=3, cache_path=path, batch_size=2)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-9])
    else:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        save_file({"ids": torch.zeros(2, 3, dtype=torch.int32)}, str(path), metadata=meta)
    assert torch.equal(sample_teacher_text(tiny_lm, tok, 5, 12, seed=3, cache_path=path, batch_size=2), s)
