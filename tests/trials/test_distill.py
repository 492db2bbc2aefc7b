"""ILKD loss components on tiny models."""
import copy

import pytest
import torch

from trials.distill import DistillWeights, _masked_attention_kl, forward_for_distillation, ilkd_loss

ALL = DistillWeights(emb=1, att=1, hid=1, ce=1, logits=1, temperature=2.0)


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_every_component_is_zero_for_identical_student_and_positive_otherwise(kind, make_tiny_model, tiny_inputs):
    teacher = make_tiny_model(kind)
    inputs = tiny_inputs(kind)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    t_out = forward_for_distillation(teacher, ids, mask)
    same = forward_for_distillation(copy.deepcopy(teacher), ids, mask)
    out = ilkd_loss(same, t_out, ALL, attention_mask=mask)
    for name in ("emb", "att", "hid", "logits"):
        assert out.parts[name] == pytest.approx(0.0, abs=1e-6), name

    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.get_input_embeddings().weight.mul_(1.5)  # changes embeddings, attention, hidden states, logits
    out = ilkd_loss(forward_for_distillation(student, ids, mask), t_out, ALL, attention_mask=mask)
    for name in ("emb", "att", "hid", "logits"):
        assert out.parts[name] > 0, name  # a random classifier head has near-zero logits: tiny but positive
    expected = sum(out.parts[k] for k in ("emb", "att", "hid", "logits"))  # every α is 1
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_weights_scale_the_total(make_tiny_model, tiny_inputs):
    teacher = make_tiny_model("gpt2")
    student = make_tiny_model("gpt2", seed=1)
    ids = tiny_inputs("gpt2")["input_ids"]
    s, t = forward_for_distillation(student, ids), forward_for_distillation(teacher, ids)
    w = DistillWeights(emb=0.5, att=0.25, hid=2.0, ce=0.0, logits=0.0)
    out = ilkd_loss(s, t, w)
    assert out.loss.item() == pytest.approx(0.5 * out.parts["emb"] + 0.25 * out.parts["att"] + 2.0 * out.parts["hid"],
                                            rel=1e-5)
    assert "logits" not in out.parts  # skipped at α = 0


def test_attention_kl_ignores_padded_positions():
    g = torch.Generator().manual_seed(0)
    att_t = torch.softmax(torch.randn(2, 2, 5, 5, generator=g), -1)
    att_s = torch.softmax(torch.randn(2, 2, 5, 5, generator=g), -1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    base = _masked_attention_kl(att_s, att_t, mask)
    # Whatever the student attends to from padded query rows must not change the loss.
    noisy = att_s.clone()
    noisy[1, :, 3:] = torch.softmax(torch.randn(2, 2, 5, generator=g) * 10, -1)
    assert _masked_attention_kl(noisy, att_t, mask).item() == pytest.approx(base.item(), rel=1e-6)
    # ...but a change on a real query row does.
    noisy[0, :, 0] = torch.softmax(torch.randn(2, 5, generator=g) * 10, -1)
    assert _masked_attention_kl(noisy, att_t, mask).item() != pytest.approx(base.item(), rel=1e-6)


def test_hidden_mse_ignores_padded_positions(make_tiny_model, tiny_inputs):
    teacher = make_tiny_model("bert")
    inputs = tiny_inputs("bert")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    t = forward_for_distillation(teacher, ids, mask)
    s = forward_for_distillation(copy.deepcopy(teacher), ids, mask)
    hs = list(s.hidden_states)
    hs[1] = hs[1].clone()
    hs[1][1, -2:] += 100.0  # padded positions of row 1
    s.hidden_states = tuple(hs)
    assert ilkd_loss(s, t, ALL, attention_mask=mask).parts["hid"] == pytest.approx(0.0, abs=1e-6)


def test_layer_map_for_different_depths(make_tiny_model, tiny_inputs):
    teacher = make_tiny_model("gpt2")  # 4 layers
    student = make_tiny_model("gpt2", n_layer=2)
    ids = tiny_inputs("gpt2")["input_ids"]
    s, t = forward_for_distillation(student, ids), forward_for_distillation(teacher, ids)
    with pytest.raises(ValueError, match="give a layer_map"):
        ilkd_loss(s, t, ALL)
    out = ilkd_loss(s, t, ALL, layer_map=[1, 3])
    assert out.parts["hid"] > 0
    with pytest.raises(ValueError, match="one teacher layer in"):
        ilkd_loss(s, t, ALL, layer_map=[1, 4])


def test_batches_trim_trailing_padding_without_changing_outputs_or_losses():
    """GLUE tensors are padded to the longest example of the set; `batches` cuts each batch to its own longest row,
    and the classifier's logits and every masked ILKD term are the same as on the full-width batch."""
    import copy

    from transformers import BertConfig, BertForSequenceClassification

    from trials.distill import DistillWeights, forward_for_distillation, ilkd_loss
    from trials.evaluate import batches

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, attn_implementation="eager")
    teacher = BertForSequenceClassification(cfg).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    lengths = torch.tensor([3, 5, 2, 4, 12, 6])  # the set's longest row (12) is not in the first two batches
    ids = torch.randint(1, 50, (6, 16))
    mask = (torch.arange(16)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    data = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.tensor([0, 1, 0, 1, 0, 1])}
    got = list(batches(data, 2, shuffle=False, seed=0))
    assert [b["input_ids"].shape[1] for b in got] == [5, 4, 12]
    assert all(b["labels"].shape == (2,) for b in got)
    w = DistillWeights(emb=0.5, att=0.5, hid=0.5, ce=0.0, logits=1.0)
    for i, b in enumerate(got):
        full = {k: v[2 * i: 2 * i + 2] for k, v in data.items()}
        outs = []
        for batch in (b, full):
            with torch.no_grad():
                s = forward_for_distillation(student, batch["input_ids"], batch["attention_mask"])
                t = forward_for_distillation(teacher, batch["input_ids"], batch["attention_mask"])
            outs.append((s.logits, ilkd_loss(s, t, w, attention_mask=batch["attention_mask"])))
        (logits_a, loss_a), (logits_b, loss_b) = outs
        assert torch.allclose(logits_a, logits_b, atol=1e-5)
        for k in ("emb", "att", "hid", "logits"):
            assert float(loss_a.parts[k]) == pytest.approx(float(loss_b.parts[k]), rel=1e-4, abs=1e-7), k
