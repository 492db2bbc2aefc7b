"""Helpers of the benchmark scripts whose correctness a printed figure depends on (the scripts themselves are run by
hand: they time things, which unit tests must not)."""
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_model_speed_ceiling_model_has_no_linear_arithmetic_but_trains_through(arch):
    """The ceiling's stand-in model: no nn.Linear / Conv1D left (LM head included), same output shapes as dense,
    dense untouched, and a backward that still reaches the embeddings (so a training step times the whole rest)."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    ms = _load("model_speed")
    if arch == "gpt2":
        dense = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=50))
    else:
        dense = BertModel(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16, vocab_size=50))
    n_dense = sum(isinstance(m, (nn.Linear, Conv1D)) for m in dense.modules())
    stub = ms.without_linear(dense)
    assert not any(isinstance(m, (nn.Linear, Conv1D)) for m in stub.modules())
    assert sum(isinstance(m, ms._OutputOnly) for m in stub.modules()) == n_dense
    assert sum(isinstance(m, (nn.Linear, Conv1D)) for m in dense.modules()) == n_dense  # a copy was changed

    ids = torch.randint(0, 50, (2, 8))
    if arch == "gpt2":
        out_d, out_s = dense(input_ids=ids).logits, stub(input_ids=ids).logits
        loss = stub(input_ids=ids, labels=ids).loss
    else:
        out_d, out_s = dense(input_ids=ids).last_hidden_state, stub(input_ids=ids).last_hidden_state
        loss = stub(input_ids=ids).last_hidden_state.mean()
    assert out_s.shape == out_d.shape
    loss.backward()
    emb = stub.transformer.wte if arch == "gpt2" else stub.embeddings.word_embeddings
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0


def test_block_nlls_give_the_trials_perplexity_and_paired_nll_judges_by_the_interval():
    """exp(mean of the per-block NLLs) is the perplexity `trials.evaluate` reports on the same blocks; the paired
    comparison says "better" only when the whole interval is below zero, "tie" when it holds zero, and refuses
    unpaired inputs."""
    import math

    from transformers import GPT2Config, GPT2LMHeadModel

    from trials.evaluate import evaluate_lm

    common = _load("common")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=16, vocab_size=40)).eval()
    blocks = torch.randint(0, 40, (7, 12))
    nll = common.block_nlls(model, blocks, batch=3)
    assert nll.shape == (7,) and nll.dtype == torch.float64
    assert math.exp(float(nll.mean())) == pytest.approx(evaluate_lm(model, blocks, 3, "cpu")["quality"], rel=1e-5)

    base = torch.tensor([3.0, 4.0, 5.0, 3.5, 4.5], dtype=torch.float64)
    better = common.paired_nll(base - torch.tensor([0.010, 0.012, 0.008, 0.011, 0.009], dtype=torch.float64), base)
    assert better["verdict"] == "better" and better["ci_pct"][1] < 0 < -better["ppl_change_pct"]
    assert better["ppl_change_pct"] == pytest.approx(100 * math.expm1(-0.01))
    noisy = common.paired_nll(base + torch.tensor([0.05, -0.05, 0.04, -0.06, 0.01], dtype=torch.float64), base)
    assert noisy["verdict"] == "tie" and noisy["ci_pct"][0] < 0 < noisy["ci_pct"][1]
    assert common.paired_nll(base + 0.02 + torch.tensor([0.001, -0.001, 0, 0.002, -0.002], dtype=torch.float64),
                             base)["verdict"] == "worse"
    with pytest.raises(ValueError, match="equal sets"):
        common.paired_nll(base, base[:4])

    # neighbouring blocks that move together: the runs' SE sees it, the blocks' SE does not, and the wider one counts
    steps = torch.tensor([0.004, -0.002] * 8 * 8, dtype=torch.float64).view(8, 16)  # within-run alternation
    drift = torch.linspace(-0.03, 0.03, 8, dtype=torch.float64).view(8, 1)[torch.randperm(8)]  # run-level shifts
    diff = (steps + drift - 0.006).flatten()
    r = common.paired_nll(torch.zeros(128, dtype=torch.float64) + diff, torch.zeros(128, dtype=torch.float64))
    assert r["se_runs"] > r["se_blocks"] and r["se"] == r["se_runs"]
    assert r["verdict"] == "tie"
    flat = common.paired_nll(diff, torch.zeros(128, dtype=torch.float64), group=1)
    assert flat["se_runs"] is None and flat["se"] == flat["se_blocks"]
    assert flat["verdict"] == "better"  # what treating the blocks as independent would have claimed
    assert common.paired_nll(base - 0.01, base)["se_runs"] is None  # too few blocks for 8 runs of 16


def test_glue_correct_gives_the_accuracy_and_mcnemar_counts_the_discordant_examples():
    """The mean of `glue_correct` is `evaluate_glue`'s accuracy; McNemar's exact test compares only the examples
    the two classifiers disagree on (p from the binomial: 10 vs 0 is p = 2/1024) and calls a 3 vs 2 split a tie."""
    from transformers import BertConfig, BertForSequenceClassification

    from trials.evaluate import evaluate_glue

    common = _load("common")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                                     intermediate_size=32, vocab_size=30, num_labels=2)).eval()
    dev = {"input_ids": torch.randint(0, 30, (11, 6)), "attention_mask": torch.ones(11, 6, dtype=torch.long),
           "labels": torch.randint(0, 2, (11,))}
    ok = common.glue_correct(model, dev, batch=4)
    assert ok.shape == (11,) and ok.dtype == torch.bool
    assert float(ok.double().mean()) == pytest.approx(evaluate_glue(model, dev, "sst2", 4, "cpu")["quality"])

    both = torch.ones(20, dtype=torch.bool)
    a = both.clone()
    b = both.clone()
    b[:10] = False  # a alone right on 10
    r = common.mcnemar(a, b)
    assert (r["a_only"], r["b_only"], r["verdict"]) == (10, 0, "better")
    assert r["p"] == pytest.approx(2 / 1024) and r["change_points"] == pytest.approx(50.0)
    assert common.mcnemar(b, a)["verdict"] == "worse"
    c = both.clone()
    c[:3] = False
    d = both.clone()
    d[3:5] = False
    tie = common.mcnemar(d, c)
    assert (tie["a_only"], tie["b_only"], tie["verdict"]) == (3, 2, "tie")
    assert common.mcnemar(a, a) == {**common.mcnemar(a, a), "p": 1.0, "verdict": "tie", "change_points": 0.0}
    with pytest.raises(ValueError, match="equal"):
        common.mcnemar(a, a[:5])
