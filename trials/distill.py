"""Intermediate-layer knowledge distillation (ILKD), as in KnGPT2 / KroneckerBERT.

Loss = α_emb·MSE(E^S, E^T) + α_att·Σ_l KL(Att_l^T ‖ Att_l^S) + α_hid·Σ_l MSE(H_l^S, H_l^T) + α_ce·CE
       + α_logits·T²·KL(softmax(z^T/T) ‖ softmax(z^S/T))

Every term is averaged over real (non-padding) positions only. The attention KL takes the teacher as the target
distribution (TinyBERT/MiniLM convention); the KnGPT2 paper writes KL(S, T) without fixing the order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["DistillWeights", "DistillOutput", "ilkd_loss", "forward_for_distillation", "identity_layer_map"]


@dataclass
class DistillWeights:
    """The α weights of each loss term and the logits-KD temperature."""

    emb: float = 0.5
    att: float = 0.5
    hid: float = 0.5
    ce: float = 0.1
    logits: float = 0.0
    temperature: float = 2.0


@dataclass
class DistillOutput:
    loss: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)  # each unweighted component, for logging


def identity_layer_map(num_layers: int) -> list[int]:
    return list(range(num_layers))


def forward_for_distillation(model, input_ids, attention_mask=None, labels=None):
    """Run a transformers model returning hidden states and attention maps (needs eager attention)."""
    kwargs = {"input_ids": input_ids, "output_hidden_states": True, "output_attentions": True, "return_dict": True}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if labels is not None:
        kwargs["labels"] = labels
    out = model(**kwargs)
    if out.attentions is None or any(a is None for a in out.attentions):
        raise RuntimeError(
            f"{type(model).__name__} returned no attention maps: load it with attn_implementation='eager' "
            "(ILKD needs the attention probabilities)"
        )
    return out


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over (batch, position, feature), counting only positions where mask is 1."""
    sq = (a.float() - b.float()).pow(2).mean(-1)  # (B, T)
    if mask is None:
        return sq.mean()
    m = mask.to(sq.dtype)
    return (sq * m).sum() / m.sum().clamp_min(1.0)


def _masked_attention_kl(att_s: torch.Tensor, att_t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """KL(teacher ‖ student) of each query row's attention distribution, averaged over heads and real queries.

    Padded keys carry zero probability in both models (their scores are masked before the softmax), so they add
    nothing; padded queries are dropped with the mask. xlogy keeps 0·log 0 = 0 for causal-masked entries.
    """
    t = att_t.float()
    s = att_s.float().clamp_min(1e-12)
    kl_rows = (torch.xlogy(t, t) - t * s.log()).sum(-1)  # (B, H, Tq)
    kl_rows = kl_rows.mean(1)  # over heads -> (B, Tq)
    if mask is None:
        return kl_rows.mean()
    m = mask.to(kl_rows.dtype)
    return (kl_rows * m).sum() / m.sum().clamp_min(1.0)


def _teacher_heads(att_t: torch.Tensor, head_map, layer: int) -> torch.Tensor:
    """The teacher attention maps (B, H, T, T) of the heads student layer `layer` kept (all without a head_map)."""
    heads = head_map[layer] if head_map is not None and layer < len(head_map) else None
    if heads is None:
        return att_t
    return att_t[:, torch.as_tensor(heads, device=att_t.device)]


def _logits_kd(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Vanilla KD: T²·KL(softmax(z^T/T) ‖ softmax(z^S/T)), averaged over real positions (or examples)."""
    log_p_s = F.log_softmax(z_s.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(z_t.float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if mask is not None and kl.dim() == 2:
        m = mask.to(kl.dtype)
        kl = (kl * m).sum() / m.sum().clamp_min(1.0)
    else:
        kl = kl.mean()
    return kl * temperature**2


def ilkd_loss(
    student_out,
    teacher_out,
    weights: DistillWeights,
    *,
    attention_mask: torch.Tensor | None = None,
    layer_map: list[int] | None = None,
    ce_loss: torch.Tensor | None = None,
    head_map: list[list[int] | None] | None = None,
) -> DistillOutput:
    """Combine the ILKD terms from two `forward_for_distillation` outputs.

    Args:
        student_out / teacher_out: transformers outputs with `hidden_states` (embeddings first, then one per
            layer) and `attentions` (one per layer); teacher_out None means cross-entropy only.
        weights: the α of each term; a term whose α is 0 is still computed for logging unless it is expensive
            (logits KD is skipped at α = 0).
        attention_mask: (B, T) with 1 on real tokens; None means no padding.
        layer_map: student layer l is matched to teacher layer layer_map[l] (default: identity, same depth).
        ce_loss: the task/LM cross-entropy already computed by the model (labels passed to forward), or None.
        head_map: per student layer, the teacher heads its attention heads are (a structurally pruned student,
            `kron.methods.prune.structure.kept_heads`), or None where it has all the teacher's heads: the attention
            term compares each remaining head with the teacher head it was.
    """
    if teacher_out is None:  # plain cross-entropy training: nothing to distil
        if ce_loss is None:
            raise ValueError("without a teacher output the loss is the cross-entropy alone, and none was given")
        return DistillOutput(weights.ce * ce_loss, {"ce": float(ce_loss.detach())})
    hs_s, hs_t = student_out.hidden_states, teacher_out.hidden_states
    at_s, at_t = student_out.attentions, teacher_out.attentions
    n_layers = len(at_s)
    if layer_map is None:
        if len(at_t) != n_layers:
            raise ValueError(
                f"student has {n_layers} layers and teacher {len(at_t)}: give a layer_map (student layer -> teacher layer)"
            )
        layer_map = identity_layer_map(n_layers)
    if len(layer_map) != n_layers or any(not 0 <= j < len(at_t) for j in layer_map):
        raise ValueError(f"layer_map {layer_map} must give one teacher layer in [0, {len(at_t)}) per student layer")

    parts: dict[str, torch.Tensor] = {}
    parts["emb"] = _masked_mse(hs_s[0], hs_t[0], attention_mask)
    parts["att"] = sum(_masked_attention_kl(at_s[l], _teacher_heads(at_t[j], head_map, l), attention_mask)
                       for l, j in enumerate(layer_map))
    # hidden_states[l + 1] is the output of layer l.
    parts["hid"] = sum(_masked_mse(hs_s[l + 1], hs_t[j + 1], attention_mask) for l, j in enumerate(layer_map))
    total = weights.emb * parts["emb"] + weights.att * parts["att"] + weights.hid * parts["hid"]
    if ce_loss is not None:
        parts["ce"] = ce_loss
        total = total + weights.ce * ce_loss
    if weights.logits > 0:
        z_s, z_t = student_out.logits, teacher_out.logits
        if z_s.dim() == 3:  # causal LM: position t predicts token t+1
            z_s, z_t = z_s[:, :-1], z_t[:, :-1]
            mask = attention_mask[:, 1:] if attention_mask is not None else None
        else:
            mask = None
        parts["logits"] = _logits_kd(z_s, z_t, weights.temperature, mask)
        total = total + weights.logits * parts["logits"]
    return DistillOutput(total, {k: float(v.detach()) for k, v in parts.items()})
