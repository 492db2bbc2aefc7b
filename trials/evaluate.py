"""Evaluation of a (compressed) model during a trial: perplexity of a causal LM, GLUE metrics of a classifier, or
the held-out ILKD loss of an encoder, each with the model's forward throughput; and the batching both training
and evaluation use."""
from __future__ import annotations

import math
import time
from typing import Iterator

import torch

from .distill import DistillWeights, forward_for_distillation, ilkd_loss

__all__ = ["batches", "evaluate_glue", "evaluate_kd", "evaluate_lm", "sync"]


def batches(tensors: dict[str, torch.Tensor], batch_size: int, *, shuffle: bool, seed: int) -> Iterator[dict]:
    """Endless shuffled batches (training), or one ordered pass (evaluation). With an `attention_mask`, each batch
    drops the trailing columns that are padding in all of its rows (GLUE sets are padded to their longest example,
    most batches are far shorter): the model's outputs on real tokens and the masked losses are unchanged."""
    n = next(iter(tensors.values())).shape[0]
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
        # training drops the ragged last batch so every step sees batch_size examples
        stop = max(n - batch_size + 1, 1) if shuffle else n
        for i in range(0, stop, batch_size):
            idx = order[i : i + batch_size]
            yield _trim_padding({k: v[idx] for k, v in tensors.items()})
        if not shuffle:
            return


def _trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return batch
    used = mask.any(dim=0).nonzero()
    width = int(used.max()) + 1 if used.numel() else 1
    if width == mask.shape[1]:
        return batch
    return {k: v[:, :width] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_lm(model, blocks: torch.Tensor, batch_size: int, device, max_batches: int | None = None) -> dict:
    """Perplexity exp(mean next-token NLL) over full blocks, and the model's forward throughput."""
    model.eval()
    nll, count, seconds = 0.0, 0, 0.0
    for b, i in enumerate(range(0, blocks.shape[0], batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        ids = blocks[i : i + batch_size].to(device)
        t0 = time.perf_counter()
        logits = model(input_ids=ids).logits
        sync(device)
        seconds += time.perf_counter() - t0
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += ids[:, 1:].numel()
    mean = nll / max(count, 1)
    ppl = math.exp(mean) if mean < 700 else float("inf")
    tokens = count + (count // max(blocks.shape[1] - 1, 1))
    return {"quality": ppl, "val_nll": mean, "throughput_tokens_per_s": tokens / seconds if seconds else None}


@torch.no_grad()
def evaluate_glue(model, data: dict[str, torch.Tensor], task: str, batch_size: int, device,
                  max_batches: int | None = None) -> dict:
    """The task's GLUE metrics on the dev split (main metric as `quality`) and forward throughput."""
    from .glue import glue_metrics, main_metric

    model.eval()
    preds, labels, seconds, tokens = [], [], 0.0, 0
    for b, batch in enumerate(batches(data, batch_size, shuffle=False, seed=0)):
        if max_batches is not None and b >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        t0 = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sync(device)
        seconds += time.perf_counter() - t0
        tokens += int(batch["attention_mask"].sum())
        preds.append(logits.squeeze(-1).float().cpu() if logits.shape[-1] == 1 else logits.argmax(-1).cpu())
        labels.append(batch["labels"].cpu())
    metrics = glue_metrics(task, torch.cat(preds).numpy(), torch.cat(labels).numpy())
    name = main_metric(task)[0]
    return {"quality": float(metrics[name]), **{f"glue_{k}": float(v) for k, v in metrics.items()},
            "throughput_tokens_per_s": tokens / seconds if seconds else None}


@torch.no_grad()
def evaluate_kd(student, teacher, blocks: torch.Tensor, weights: DistillWeights, batch_size: int, device,
                max_batches: int | None = None, layer_map=None, head_map=None) -> dict:
    """Mean ILKD loss on held-out text: the stage-1 metric for models without an LM head (BERT encoders)."""
    student.eval()
    total, n, seconds, tokens = 0.0, 0, 0.0, 0
    for b, i in enumerate(range(0, blocks.shape[0], batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        ids = blocks[i : i + batch_size].to(device)
        t_out = forward_for_distillation(teacher, ids)
        t0 = time.perf_counter()
        s_out = forward_for_distillation(student, ids)
        sync(device)
        seconds += time.perf_counter() - t0
        tokens += ids.numel()
        total += ilkd_loss(s_out, t_out, weights, layer_map=layer_map, head_map=head_map).loss.item()
        n += 1
    return {"quality": total / max(n, 1), "throughput_tokens_per_s": tokens / seconds if seconds else None}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
