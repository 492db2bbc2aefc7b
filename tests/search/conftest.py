"""Fixtures of the search tests: a tiny GPT-2 teacher on disk, search configs for it, and ONE Ray instance for the
whole session (tests marked `ray`).

The Ray fixture starts Ray the way `kronsearch search` does (quiet, no dashboard, the source tree on the workers'
PYTHONPATH, the data cache in a temporary folder), so `run_search` finds it running and reuses it.
"""
from __future__ import annotations

import copy
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
WORDS = ("the student learns from the teacher while every weight becomes a product of two small factors and the "
         "search looks for shapes ranks and layers that keep quality high at a small size").split()


@pytest.fixture(scope="session")
def kron_cache(tmp_path_factory):
    """KRONSEARCH_CACHE for the session (teacher samples, token caches), inherited by Ray workers."""
    path = tmp_path_factory.mktemp("kron-cache")
    old = os.environ.get("KRONSEARCH_CACHE")
    os.environ["KRONSEARCH_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("KRONSEARCH_CACHE", None)
    else:
        os.environ["KRONSEARCH_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, kron_cache):
    """A tiny GPT-2 LM (2 layers, d=32, 4 heads... of width 8) with a ~300-token byte-level BPE, on disk."""
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny-gpt2-teacher"))


def make_tiny_teacher(path: Path) -> Path:
    """The tiny teacher written to `path` (also benchmarks/search_scale.py's)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from trials.teacher import train_bpe_tokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) for _ in range(300)]
    tok = train_bpe_tokenizer(texts, 300, min_frequency=1)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     architectures=["GPT2LMHeadModel"])
    model = GPT2LMHeadModel(cfg)
    # A couple of seconds of training, so that compression visibly costs quality (a random teacher's perplexity is
    # about its vocabulary size whatever the student does, and ASHA would have nothing to rank).
    ids = torch.tensor([t for text in texts for t in tok(text + tok.eos_token)["input_ids"]])
    blocks = ids[: len(ids) // 16 * 16].view(-1, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        for _ in range(120):
            batch = blocks[torch.randint(0, len(blocks), (16,), generator=g)]
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval().save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def tiny_search_dict(teacher: Path, storage: Path, name: str = "tiny", **search) -> dict:
    """A small but complete search config for the tiny teacher (2-layer GPT-2): free layers, 4 shapes per matrix."""
    cfg = {
        "name": name,
        "trial": {
            "teacher": str(teacher),
            "device": "cpu",
            "save_checkpoint": False,
            "data": {"source": "teacher-samples", "seq_len": 16, "num_samples": 16, "val_blocks": 4},
            "stage1": {"max_steps": 6, "eval_every": 2, "batch_size": 2, "early_stopping": None, "lr": 1e-3},
        },
        "space": {"groups": ["attention", "ffn_in", "ffn_out"], "layers": "free", "max_shapes": 4},
        "search": {"num_samples": 4, "max_concurrent": 2, "storage": str(storage), "seed": 0,
                   "asha": {"grace_period": 2, "reduction_factor": 2}, "reference": False},
    }
    cfg["search"].update(search)
    return cfg


@pytest.fixture
def tiny_search(tiny_teacher, tmp_path):
    def make(name: str = "tiny", **search) -> dict:
        return copy.deepcopy(tiny_search_dict(tiny_teacher, tmp_path / "runs", name, **search))

    return make


@pytest.fixture(scope="session")
def ray_session(kron_cache):
    """One local Ray for every `ray` test of the session (2 CPUs), started like `kronsearch search` starts it."""
    from search.raystart import init_local_ray

    import ray

    if not ray.is_initialized():
        init_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()
