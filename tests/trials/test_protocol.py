"""`kronsearch eval --protocol gptq`: WikiText-2 / C4 perplexity in the GPTQ convention, checked against a hand
computation on a tiny model, and the raw-file reader against the hub's rows."""
import json
import math
from pathlib import Path

import pytest
import torch

from kron.errors import ConfigError, DataError
from search.cli import main
from trials.protocol import CORPORA, default_seq_len, evaluate_gptq, parse_source, raw_rows, windows

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
RAW_TEST = SHARED / "data" / "wikitext-2" / "raw" / "wiki.test.raw"
GPT2_TOKENIZER = SHARED / "data" / "tokenizers" / "gpt2"

RAW = " \n = Title = \n \n the model learns from the teacher \n the student compresses every weight \n\n" \
      " = = Section = = \n \n the search explores shapes ranks and layers to find good trade offs \n"


@pytest.fixture
def raw_file(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_bytes((RAW * 6).encode())
    return path


def _load(tiny_lm_teacher):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(tiny_lm_teacher)).eval(), AutoTokenizer.from_pretrained(
        str(tiny_lm_teacher))


def _hand_perplexity(model, ids: list[int], seq_len: int, max_windows=None) -> tuple[float, int]:
    """exp(mean NLL) over every predicted token of the full, non-overlapping windows — one window at a time, one
    token at a time, with log_softmax: nothing shared with the code under test."""
    n = len(ids) // seq_len if max_windows is None else min(len(ids) // seq_len, max_windows)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):
            window = ids[w * seq_len:(w + 1) * seq_len]
            logp = torch.log_softmax(model(input_ids=torch.tensor([window])).logits[0].double(), dim=-1)
            for t in range(seq_len - 1):
                total -= logp[t, window[t + 1]].item()
                count += 1
    return math.exp(total / count), n


def test_raw_rows_are_the_hub_rows(raw_file):
    rows = raw_rows(raw_file)
    assert rows[:4] == ["", " = Title = \n", "", " the model learns from the teacher \n"]
    assert len(rows) == (RAW * 6).count("\n")  # one row per line, blank lines kept as ""


def test_gptq_perplexity_matches_a_hand_computation(tiny_lm_teacher, raw_file):
    model, tok = _load(tiny_lm_teacher)
    text = "\n\n".join("" if not line.strip() else line + "\n" for line in (RAW * 6).split("\n")[:-1])
    ids = tok(text)["input_ids"]
    expected, n = _hand_perplexity(model, ids, 16)

    got = evaluate_gptq(model, tok, str(raw_file), seq_len=16, batch_size=3, device="cpu")
    assert got["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert got["stream_tokens"] == len(ids) and got["windows"] == n == len(ids) // 16
    assert got["context"] == got["stride"] == 16 and got["predicted_tokens"] == n * 15
    assert got["unused_tokens"] == len(ids) - n * 16 and 0 <= got["unused_tokens"] < 16
    assert got["corpus"] == "wikitext2" and got["joiner"] == "\n\n" and got["protocol"] == "gptq"
    # the batch size does not change the number
    again = evaluate_gptq(model, tok, f"wikitext2:{raw_file}", seq_len=16, batch_size=1, device="cpu")
    assert again["perplexity"] == pytest.approx(got["perplexity"], rel=1e-6)


def test_gptq_default_context_is_the_models_at_most_2048(tiny_lm_teacher):
    model, _ = _load(tiny_lm_teacher)
    assert default_seq_len(model) == 64
    long = type("M", (), {"config": type("C", (), {"max_position_embeddings": 131072})()})()
    assert default_seq_len(long) == 2048


def test_c4_convention_caps_documents_and_windows(tiny_lm_teacher, tmp_path):
    model, tok = _load(tiny_lm_teacher)
    docs = [f"the teacher and the student number {i} learn shapes ranks and layers" for i in range(1200)]
    path = tmp_path / "c4-validation.json"
    path.write_text("\n".join(json.dumps({"text": d, "url": "x"}) for d in docs))
    ids = tok(" ".join(docs[:1100]))["input_ids"]
    assert len(ids) // 8 > 256  # so the window cap is what limits it
    expected, n = _hand_perplexity(model, ids, 8, max_windows=256)

    got = evaluate_gptq(model, tok, f"c4:{path}", seq_len=8, batch_size=64, device="cpu")
    assert got["rows"] == 1100 and got["windows"] == n == 256 and got["joiner"] == " "
    assert got["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_bad_protocol_inputs(tiny_lm_teacher, raw_file, tmp_path):
    model, tok = _load(tiny_lm_teacher)
    with pytest.raises(ConfigError, match="longer than the model's context"):
        evaluate_gptq(model, tok, str(raw_file), seq_len=65, batch_size=2, device="cpu")
    with pytest.raises(DataError, match="fewer than one window of 64"):
        (tmp_path / "short.raw").write_text(" a b \n")
        evaluate_gptq(model, tok, str(tmp_path / "short.raw"), seq_len=None, batch_size=2, device="cpu")
    with pytest.raises(DataError, match="neither a corpus"):
        parse_source("wikitext3")
    with pytest.raises(ConfigError, match="give a path after 'c4:'"):
        parse_source("c4:")
    assert parse_source(None) == (CORPORA["wikitext2"], None)
    with pytest.raises(DataError, match="fewer than one window"):
        windows(torch.arange(5), 8)


def test_eval_cli_states_protocol_context_stride_and_windows(tiny_lm_teacher, raw_file, capsys):
    rc = main(["eval", "--model", str(tiny_lm_teacher), "--protocol", "gptq", "--data", str(raw_file),
               "--seq-len", "32"])
    out = capsys.readouterr().out
    assert rc == 0
    for key in ("protocol: gptq", "context: 32", "stride: 32", "windows:", "perplexity:"):
        assert key in " ".join(out.split()), out

    rc = main(["eval", "--model", str(tiny_lm_teacher), "--protocol", "gptq", "--data", str(raw_file), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0 and result["context"] == 64 and result["windows"] == result["stream_tokens"] // 64

    # the project's block perplexity is still there, and says what it is
    rc = main(["eval", "--model", str(tiny_lm_teacher), "--data", str(raw_file), "--seq-len", "32", "--json"])
    blocks = json.loads(capsys.readouterr().out)
    assert rc == 0 and blocks["protocol"] == "blocks" and blocks["context"] == blocks["stride"] == 32


def test_eval_cli_bad_seq_len_is_one_line_exit_2(tiny_lm_teacher, raw_file, capsys):
    rc = main(["eval", "--model", str(tiny_lm_teacher), "--protocol", "gptq", "--data", str(raw_file),
               "--seq-len", "4096"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "context (64 positions)" in err


@pytest.mark.skipif(not (RAW_TEST.is_file() and GPT2_TOKENIZER.is_dir()),
                    reason="needs ../shared/data (WikiText-2 raw test file and the GPT-2 tokenizer files)")
def test_local_raw_wikitext2_gives_the_hub_stream():
    """GPT-2's tokenizer on "\\n\\n".join of wikitext-2-raw-v1 test gives 287,644 tokens (the figure of
    Hugging Face's "Perplexity of fixed-length models" guide, which loads the hub dataset)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from trials.protocol import token_stream

    bpe = Tokenizer(models.BPE.from_file(str(GPT2_TOKENIZER / "vocab.json"), str(GPT2_TOKENIZER / "merges.txt")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    rows = raw_rows(RAW_TEST)
    assert len(rows) == 4358
    assert token_stream(rows, "\n\n", tok).numel() == 287644


def test_gptq_is_a_perplexity_protocol_only(tiny_lm_teacher, capsys):
    rc = main(["eval", "--model", str(tiny_lm_teacher), "--protocol", "gptq", "--glue-task", "sst2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--protocol gptq is a perplexity protocol" in err and len(err.splitlines()) == 1


def test_text_output_shows_the_joiner_on_one_line(tiny_lm_teacher, raw_file, capsys):
    assert main(["eval", "--model", str(tiny_lm_teacher), "--protocol", "gptq", "--data", str(raw_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(line.strip() for line in lines)  # no blank line: the joiner is printed as "\n\n"
    assert any(line.strip() == 'joiner: "\\n\\n"' for line in lines), lines
