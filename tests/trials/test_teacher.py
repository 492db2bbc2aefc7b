"""trials.teacher and `kronsearch teacher ...`: train a tiny GPT-2, fine-tune tiny models, the demo bundle."""
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from kron.errors import CheckpointError, ConfigError, DataError
from search.cli import main as cli_main
from trials import teacher as tt
from trials.teacher import TeacherConfig, lr_at

torch.set_num_threads(1)

SENTENCES = [
    "the cat sat on the mat .",
    "a dog ran in the park .",
    "the bird sang a song in the tree .",
    "my friend likes green tea and cake .",
    "it rained all day so we stayed home .",
    "the old man walked to the shop .",
]


def last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "train.txt").write_text("\n".join(SENTENCES * 40) + "\n", encoding="utf-8")
    (d / "valid.txt").write_text("\n".join(SENTENCES[::-1] * 4) + "\n\n", encoding="utf-8")
    (d / "test.txt").write_text("\n".join(SENTENCES * 4) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """`kronsearch teacher train` on the tiny corpus; returns (out dir, final JSON summary, stdout)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("teacher")
    cache = tmp_path_factory.mktemp("cache")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli_main([
            "teacher", "train", "--data", str(corpus), "--out", str(out), "--vocab-size", "300",
            "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--seq-len", "16", "--batch-size", "8",
            "--lr", "3e-3", "--warmup-steps", "5", "--max-steps", "60", "--eval-every", "20", "--threads", "1",
            "--cache-dir", str(cache),
        ])
    assert rc == 0
    return out, last_json(buf.getvalue()), buf.getvalue()


def test_train_writes_a_loadable_safetensors_model(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary, stdout = trained
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md"} <= names
    assert not any(n.endswith(".bin") for n in names)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id == tok.bos_token_id
    assert len(tok) == model.config.vocab_size <= 300 and model.config.n_layer == 1
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    assert "step    20" in stdout and "valid loss" in stdout


def test_train_learns_the_corpus(trained):
    out, summary, _ = trained
    # an untrained model is near-uniform (ppl ~ vocab size); six repeated sentences are easy to learn
    assert summary["steps"] == 60 and summary["valid_ppl"] < 30 and summary["test_ppl"] < 30
    assert summary["test_tokens"] > 0
    card = (out / "MODEL_CARD.md").read_text()
    assert "teacher train" in card and str(summary["valid_ppl"]) in card and "per BPE token" in card


def test_single_file_corpus_holds_out_a_valid_tail(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(SENTENCES * 30) + "\n", encoding="utf-8")
    cfg = TeacherConfig(vocab_size=280, n_layer=1, n_embd=16, n_head=2, seq_len=8, batch_size=4, max_steps=3,
                        eval_every=10, valid_fraction=0.1)
    summary = tt.train_teacher(src, tmp_path / "out", cfg, cache_dir=tmp_path / "cache", log=lambda m: None)
    assert summary["test_ppl"] is None and summary["steps"] == 3 and summary["valid_tokens"] > 0


def test_train_rejects_bad_config_and_data(tmp_path, capsys):
    with pytest.raises(ConfigError, match="divisible"):
        TeacherConfig(n_embd=30, n_head=4)
    with pytest.raises(ConfigError, match="n_positions"):
        TeacherConfig(seq_len=64, n_positions=32)
    rc = cli_main(["teacher", "train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "missing" in capsys.readouterr().err
    with pytest.raises(DataError):
        tt.train_teacher(tmp_path / "missing.txt", tmp_path / "o")


def test_lr_schedule():
    cfg = TeacherConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0.0, 0, cfg) == pytest.approx(1e-4)
    assert lr_at(0.0, 9, cfg) == pytest.approx(1e-3)
    assert lr_at(0.5, 50, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(1.0, 99, cfg) == pytest.approx(1e-4) and lr_at(3.0, 300, cfg) == pytest.approx(1e-4)


# ------------------------------------------------------------------------------------------- fine-tuning

WORDS = ["good", "great", "fun", "bad", "awful", "dull", "film", "the", "a", "is", "was", "very", "."]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    d = tmp_path_factory.mktemp("bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizer.from_pretrained(str(d))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertForMaskedLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def sst2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("glue") / "SST-2"
    d.mkdir()
    pos = ["the film was very good .", "a great film .", "fun", "the film is great", "very fun ."]
    neg = ["the film was very bad .", "an awful film .", "dull", "the film is awful", "very dull ."]
    rows = [f"{s}\t1" for s in pos] + [f"{s}\t0" for s in neg]
    (d / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows * 4) + "\n", encoding="utf-8")
    (d / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return d


def test_finetune_tiny_bert_on_sst2(tiny_bert, sst2_dir, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "ft"
    rc = cli_main(["teacher", "finetune", "--model", str(tiny_bert), "--task", "SST-2", "--data", str(sst2_dir.parent),
                   "--out", str(out), "--epochs", "10", "--lr", "2e-3", "--batch-size", "8", "--max-len", "16",
                   "--threads", "1"])
    assert rc == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["task"] == "sst2" and summary["dev_examples"] == 10 and summary["steps"] == 50
    assert summary["main_metric"] == "accuracy" and summary["dev"]["accuracy"] >= 0.8  # learnable toy task
    assert json.loads((out / "eval_results.json").read_text())["dev"] == summary["dev"]
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 2 and model.config.id2label[1] == "positive"
    assert AutoTokenizer.from_pretrained(out)("good film")["input_ids"][0] == 2  # [CLS]


def test_finetune_regression_and_max_steps(tiny_bert, tmp_path):
    d = tmp_path / "STS-B"
    d.mkdir()
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    rows = [f"{i}\tg\tf\ty\t{i}\tnone\tnone\tthe film\t{s}\t{v}" for i, (s, v) in
            enumerate([("the film", "5.000"), ("a film", "4.0"), ("dull", "0.5"), ("very bad", "1.25")])]
    (d / "train.tsv").write_text(head + "\n".join(rows * 3) + "\n", encoding="utf-8")
    (d / "dev.tsv").write_text(head + "\n".join(rows) + "\n", encoding="utf-8")
    cfg = tt.FinetuneConfig(epochs=10, batch_size=4, max_steps=2, max_len=16)
    summary = tt.finetune_teacher(tiny_bert, "sts-b", tmp_path / "out", cfg, data=d, log=lambda m: None)
    assert summary["steps"] == 2 and set(summary["dev"]) == {"pearson", "spearman"}
    assert summary["main_metric"] == "pearson"



def test_finetune_replaces_the_teacher_folder_atomically(tiny_bert, sst2_dir, tmp_path, monkeypatch):
    """A run that fails while saving leaves the previous teacher whole; a finished one replaces it entirely."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous teacher")
    (out / "stale.txt").write_text("from an older run")
    cfg = tt.FinetuneConfig(epochs=1, batch_size=8, max_steps=1, max_len=16)
    real_save = tt.save_model_dir

    def save_then_crash(model, tokenizer, where):
        real_save(model, tokenizer, where)
        raise OSError("disk full")

    monkeypatch.setattr(tt, "save_model_dir", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        tt.finetune_teacher(tiny_bert, "sst2", out, cfg, data=sst2_dir, log=lambda m: None)
    assert (out / "model.safetensors").read_bytes() == b"previous teacher"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the half-written copy is gone
    monkeypatch.setattr(tt, "save_model_dir", real_save)
    tt.finetune_teacher(tiny_bert, "sst2", out, cfg, data=sst2_dir, log=lambda m: None)
    assert not (out / "stale.txt").exists() and (out / "eval_results.json").is_file()
    assert (out / "model.safetensors").read_bytes() != b"previous teacher"

def test_finetune_gpt2_without_pad_token(tmp_path, sst2_dir):
    from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

    tok = tt.train_bpe_tokenizer(["the film was very good .", "an awful film ."] * 5, 270, min_frequency=1)
    tok.pad_token = None  # GPT-2's own tokenizer has none
    src = tmp_path / "gpt2"
    cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(cfg).save_pretrained(src)
    tok.save_pretrained(src)
    cfg = tt.FinetuneConfig(epochs=1, batch_size=8, max_len=16)
    summary = tt.finetune_teacher(src, "sst2", tmp_path / "out", cfg, data=sst2_dir, log=lambda m: None)
    assert 0 <= summary["dev"]["accuracy"] <= 1
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert model.config.pad_token_id == tok.eos_token_id


def test_finetune_errors(tiny_bert, sst2_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="valid"):
        tt.finetune_teacher(tiny_bert, "squad", tmp_path / "o", data=sst2_dir)
    with pytest.raises(DataError, match="CoLA"):
        tt.finetune_teacher(tiny_bert, "cola", tmp_path / "o", data=sst2_dir.parent)
    rc = cli_main(["teacher", "finetune", "--model", str(tmp_path), "--task", "sst2", "--data", str(sst2_dir),
                   "--out", str(tmp_path / "o")])
    assert rc == 2 and "config.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- demo teacher


def test_demo_teacher_dir_reports_missing_files(monkeypatch):
    import kron.models

    monkeypatch.setattr(kron.models, "DEMO_FILES", kron.models.DEMO_FILES + ("no_such_file.bin",))
    with pytest.raises(CheckpointError, match="no_such_file.bin"):
        tt.demo_teacher_dir()


def test_demo_teacher_bundle():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tt.demo_teacher_dir()
    files = {p.name: p.stat().st_size for p in path.iterdir()}
    assert sum(files.values()) <= 25 * 2**20 and "MODEL_CARD.md" in files
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in files)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    cfg = model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions, cfg.vocab_size) == (4, 256, 4, 256, 8192)
    assert model.dtype == torch.float32 and len(tok) == 8192 and tok.eos_token == "<|endoftext|>"
    ids = tok("The game was released in Japan", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 8.0  # a trained model: uniform guessing over 8192 tokens would be ln 8192 = 9.0
