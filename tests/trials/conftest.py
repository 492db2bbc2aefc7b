"""Tiny teachers on disk for end-to-end trial tests: a GPT-2 LM with a byte-level BPE, a BERT classifier with a
WordPiece vocabulary, a small text corpus and an SST-2-layout GLUE folder — all written by the tests."""
from __future__ import annotations

import random

import pytest

WORDS = ("the model compresses every weight into two small factors and the student learns from the teacher "
         "while the search explores shapes ranks and layers to find good trade offs between size and quality").split()


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) for _ in range(n)]


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for split, n, seed in (("train", 400, 0), ("valid", 60, 1), ("test", 60, 2)):
        (root / f"{split}.txt").write_text("\n".join(_sentences(n, seed)) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_lm_teacher(tmp_path_factory, text_corpus):
    """A tiny GPT-2 LM (2 layers, d=32) with a 300-token byte-level BPE, saved with safetensors."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from trials.teacher import train_bpe_tokenizer

    path = tmp_path_factory.mktemp("tiny-gpt2")
    tok = train_bpe_tokenizer((text_corpus / "train.txt").read_text().splitlines(), 300, min_frequency=1)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_bert_classifier(tmp_path_factory):
    """A tiny BERT sequence classifier (2 labels) with a WordPiece vocabulary covering WORDS."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS)), "good", "bad", "."]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def sst2_dir(tmp_path_factory):
    """An SST-2 folder in the GLUE TSV layout (header `sentence\\tlabel`)."""
    root = tmp_path_factory.mktemp("glue") / "SST-2"
    root.mkdir()
    rng = random.Random(0)
    for split, n in (("train", 64), ("dev", 24)):
        rows = ["sentence\tlabel"]
        for s in _sentences(n, 10 + n):
            label = rng.randint(0, 1)
            rows.append(f"{s} {'good' if label else 'bad'} .\t{label}")
        (root / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root
