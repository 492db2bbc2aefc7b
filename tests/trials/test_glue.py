"""trials.glue: TSV loaders on hand-written fixtures, task aliases, encoding, metrics against hand-computed values."""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch

from kron.errors import ConfigError, DataError
from trials.glue import GlueExample, encode_glue, get_task, glue_metrics, load_glue, main_metric, read_glue_tsv

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def write(path: Path, text: str, encoding="utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


@pytest.fixture
def glue_root(tmp_path):
    root = tmp_path / "glue"
    # CoLA: no header, 4 columns; a bare quote must not swallow the next line; no trailing newline (as in GLUE)
    write(root / "CoLA" / "dev.tsv",
          'gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n'
          'gj04\t0\t*\tHe said "that the cat.\n'
          'cj99\t1\t\tThe weights made the rope stretch.')
    write(root / "SST-2" / "dev.tsv", "sentence\tlabel\nit 's a \"charming\" journey . \t1\nbleak and desperate \t0\n")
    # MRPC: the header starts with a UTF-8 byte-order mark
    write(root / "MRPC" / "dev.tsv",
          "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
          "1\t1355540\t1355592\tHe said the pie doesn't fit.\t\"The pie does not fit.\n"
          "0\t2029631\t2029565\tMagnarelli said so.\tHis wife said he was \"100 percent\" behind.\n")
    write(root / "RTE" / "dev.tsv",
          "index\tsentence1\tsentence2\tlabel\n0\tDana died.\tDana had an accident.\tnot_entailment\n"
          "1\tBacteria mutate.\tBacteria change.\tentailment\n")
    write(root / "WNLI" / "train.tsv",
          "index\tsentence1\tsentence2\tlabel\n0\tThe drain is clogged with hair.\tThe hair has to go.\t0\n"
          "1\tJane knocked.\tSusan did not answer.\t1\n")
    write(root / "QNLI" / "dev.tsv",
          "index\tquestion\tsentence\tlabel\n0\tWhat came?\tThe constitution came.\tentailment\n")
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    write(root / "STS-B" / "dev.tsv",
          header + "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man is dancing.\tA man dances.\t5.000\n"
                   "1\tmain-captions\tMSRvid\t2012test\t0002\tnone\tnone\tA child rides.\tA dog sleeps.\t0.250\n")
    return root


def test_cola_headerless_layout(glue_root):
    ex = load_glue("CoLA", glue_root, "dev")
    assert [e.label for e in ex] == [1, 0, 1]
    assert ex[1].text_a == 'He said "that the cat.' and ex[1].text_b is None
    assert ex[2].text_a == "The weights made the rope stretch."


def test_sst2_and_quotes(glue_root):
    ex = load_glue("sst-2", glue_root / "SST-2", "validation")  # task directory or GLUE root both work
    assert ex == [GlueExample('it \'s a "charming" journey . ', None, 1), GlueExample("bleak and desperate ", None, 0)]


def test_mrpc_bom_header_and_pairs(glue_root):
    ex = load_glue("MRPC", glue_root, "dev")
    assert [e.label for e in ex] == [1, 0]
    assert ex[0].text_a == "He said the pie doesn't fit." and ex[0].text_b == '"The pie does not fit.'
    assert ex[1].text_b == 'His wife said he was "100 percent" behind.'


def test_string_and_numeric_nli_labels(glue_root):
    # HF glue ids: rte/qnli entailment=0, not_entailment=1; wnli keeps the file's 0/1
    assert [e.label for e in load_glue("rte", glue_root, "dev")] == [1, 0]
    assert load_glue("QNLI", glue_root, "dev")[0] == GlueExample("What came?", "The constitution came.", 0)
    wnli = load_glue("wnli", glue_root, "train")
    assert [e.label for e in wnli] == [0, 1] and wnli[1].text_b == "Susan did not answer."


def test_stsb_float_scores(glue_root):
    ex = load_glue("STS-B", glue_root, "dev")
    assert [e.label for e in ex] == [5.0, 0.25] and all(isinstance(e.label, float) for e in ex)
    assert (ex[0].text_a, ex[0].text_b) == ("A man is dancing.", "A man dances.")
    spec = get_task("stsb")
    assert spec.num_labels == 1 and spec.is_regression and main_metric(spec) == ("pearson", "max")


def test_missing_and_malformed_files(glue_root, tmp_path):
    with pytest.raises(DataError, match="train.tsv"):
        load_glue("sst2", glue_root, "train")
    with pytest.raises(DataError, match="nowhere"):
        load_glue("sst2", tmp_path / "nowhere", "dev")
    bad = write(tmp_path / "bad" / "dev.tsv", "sentence\tlabel\ngood film\t1\nno label here\n")
    with pytest.raises(DataError, match=r"dev.tsv:3"):
        read_glue_tsv("sst2", bad)
    badlabel = write(tmp_path / "bad2" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(DataError, match="maybe"):
        load_glue("rte", badlabel.parent, "dev")
    noheader = write(tmp_path / "bad3" / "dev.tsv", "text\tlabel\nx\t1\n")
    with pytest.raises(DataError, match="sentence"):
        load_glue("sst2", noheader.parent, "dev")
    nolabel = write(tmp_path / "bad4" / "dev.tsv", "sentence\nx\n")
    with pytest.raises(DataError, match="label"):
        load_glue("sst2", nolabel.parent, "dev")
    write(tmp_path / "bad4" / "test.tsv", "index\tsentence\n0\tan unlabelled test row\n")
    assert load_glue("sst2", nolabel.parent, "test") == [GlueExample("an unlabelled test row", None, None)]


@pytest.mark.parametrize("alias,name", [
    ("sst2", "sst2"), ("SST-2", "sst2"), ("sst-2", "sst2"), ("cola", "cola"), ("CoLA", "cola"), ("MRPC", "mrpc"),
    ("sts-b", "stsb"), ("STS-B", "stsb"), ("stsb", "stsb"), ("MNLI", "mnli"), ("qqp", "qqp"), ("RTE", "rte"),
])
def test_task_aliases(alias, name):
    assert get_task(alias).name == name


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        get_task("squad")
    assert "squad" in str(err.value) and "sst2" in str(err.value) and "stsb" in str(err.value)


def test_spec_table():
    assert get_task("mnli").num_labels == 3 and get_task("mrpc").is_pair and not get_task("sst2").is_pair
    assert main_metric("CoLA") == ("matthews_corr", "max") and main_metric("qqp") == ("f1", "max")


def test_binary_metrics_by_hand():
    # TP=2 FN=1 TN=2 FP=1: acc 4/6, F1 = 2TP/(2TP+FP+FN) = 4/6, MCC = (2*2-1*1)/sqrt(3*3*3*3) = 1/3
    labels = [1, 1, 1, 0, 0, 0]
    preds = [1, 1, 0, 0, 0, 1]
    assert glue_metrics("cola", preds, labels) == pytest.approx({"matthews_corr": 1 / 3, "accuracy": 4 / 6})
    assert glue_metrics("mrpc", preds, labels) == pytest.approx({"f1": 4 / 6, "accuracy": 4 / 6})
    # TP=3 FN=1 FP=1 TN=1: F1 = 6/8, MCC = (3*1-1*1)/sqrt(4*4*2*2) = 1/4
    labels, preds = [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 1]
    assert glue_metrics("qqp", preds, labels)["f1"] == pytest.approx(0.75)
    assert glue_metrics("CoLA", preds, labels)["matthews_corr"] == pytest.approx(0.25)


def test_metrics_accept_logits_and_tensors():
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.0, 0.1, 3.0], [0.0, 5.0, 1.0], [1.0, 0.0, 0.0]])
    assert glue_metrics("mnli", logits, torch.tensor([0, 2, 2, 0])) == {"accuracy": 0.75}


def test_regression_metrics_by_hand():
    # deviations (-1,0,1) and (-1,1,0): cov 1, variances 2 and 2 -> r = 0.5; ranks equal values -> rho = 0.5
    out = glue_metrics("stsb", np.array([[1.0], [2.0], [3.0]]), [1.0, 3.0, 2.0])
    assert out == pytest.approx({"pearson": 0.5, "spearman": 0.5})
    assert glue_metrics("stsb", [2.0, 2.0, 2.0], [1.0, 3.0, 2.0])["pearson"] == 0.0
    with pytest.raises(DataError, match="predictions"):
        glue_metrics("sst2", [1, 0], [1, 0, 1])


@pytest.fixture(scope="module")
def bert_tok(tmp_path_factory):
    from transformers import BertTokenizer

    d = tmp_path_factory.mktemp("berttok")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "dog", "."]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizer.from_pretrained(str(d))


def test_encode_pairs_with_bert_template(bert_tok):
    ex = [GlueExample("the cat", "sat .", 1), GlueExample("the dog", None, 0)]
    enc = encode_glue(ex, bert_tok, max_len=16)
    cls, sep = bert_tok.cls_token_id, bert_tok.sep_token_id
    t = bert_tok.convert_tokens_to_ids
    assert enc["input_ids"][0].tolist() == [cls, t("the"), t("cat"), sep, t("sat"), t("."), sep]
    assert enc["input_ids"][1].tolist() == [cls, t("the"), t("dog"), sep, 0, 0, 0]  # [PAD] = 0
    assert enc["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert enc["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert enc["labels"].tolist() == [1, 0] and enc["labels"].dtype == torch.long
    short = encode_glue([GlueExample("the cat sat . the dog", "the cat sat .", 1)], bert_tok, max_len=8)
    assert short["input_ids"].shape == (1, 8)


def test_encode_gpt2_style_pads_with_eos_and_joins_pairs(tmp_path):
    from trials.teacher import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["the cat sat on the mat .", "a dog ."] * 10, 280, min_frequency=1)
    tok.pad_token = None  # like GPT-2's own tokenizer
    eos = tok.eos_token_id
    ex = [GlueExample("the cat sat on the mat .", "a dog .", 2.5), GlueExample("a dog .", "the cat", 1.0)]
    enc = encode_glue(ex, tok, max_len=64)
    a = tok("the cat sat on the mat .", add_special_tokens=False)["input_ids"]
    b = tok("a dog .", add_special_tokens=False)["input_ids"]
    assert enc["input_ids"][0].tolist() == a + [eos] + b
    row1 = enc["input_ids"][1]
    n1 = int(enc["attention_mask"][1].sum())
    assert (row1[n1:] == eos).all() and n1 < enc["input_ids"].shape[1]
    assert enc["labels"].dtype == torch.float32 and enc["labels"].tolist() == [2.5, 1.0]
    assert "token_type_ids" not in enc
    cut = encode_glue(ex[:1], tok, max_len=5)
    assert cut["input_ids"].shape == (1, 5) and eos in cut["input_ids"][0].tolist()


@pytest.mark.shared
@pytest.mark.parametrize("task,count,positives", [
    ("SST-2", 872, 444), ("CoLA", 1043, 721), ("MRPC", 408, 279), ("RTE", 277, 131), ("WNLI", 71, 31),
    ("QNLI", 5463, 2761), ("STS-B", 1500, None),
])
def test_real_glue_dev_counts(task, count, positives):
    root = SHARED / "glue"
    if not (root / task / "dev.tsv").is_file():
        pytest.skip(f"shared GLUE data not found at {(root / task).resolve()}")
    ex = load_glue(task, root, "dev")
    assert len(ex) == count  # row counts from shared/data/PROVENANCE.md
    if positives is not None:  # label 1: acceptable / positive / paraphrase / not_entailment (RTE, QNLI)
        assert sum(e.label == 1 for e in ex) == positives
    assert all(e.text_a for e in ex)
    assert all((e.text_b is not None) == get_task(task).is_pair for e in ex)
