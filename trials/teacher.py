"""Small teachers: train a GPT-2 from scratch on a text corpus, fine-tune a teacher on a GLUE task.

`train_teacher` trains a byte-level BPE tokenizer and a `GPT2LMHeadModel` on one corpus, selects the
checkpoint with the best validation loss and writes a self-contained model directory (safetensors weights,
tokenizer, MODEL_CARD.md). `finetune_teacher` does the same for sequence classification on a GLUE task.
`demo_teacher_dir()` is the small GPT-2 bundled with the package (trained on WikiText-2).
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from kron.errors import CheckpointError, ConfigError, DataError
from kron.fsutil import atomic_dir, atomic_write_text

EOS_TOKEN = "<|endoftext|>"

def demo_teacher_dir() -> Path:
    """The directory of the bundled demo teacher (kron/demo_teacher; see `kron.models.demo_teacher_dir`)."""
    from kron.models import demo_teacher_dir as bundled

    return bundled()


# ------------------------------------------------------------------------------------------- tokenizer


def train_bpe_tokenizer(texts: list[str], vocab_size: int, *, min_frequency: int = 2):
    """A GPT-2-style byte-level BPE tokenizer trained on `texts`, as a transformers fast tokenizer.

    `<|endoftext|>` is BOS, EOS, UNK and PAD (GPT-2's convention); the byte alphabet is always included, so
    any text can be encoded.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise ConfigError(f"vocab_size must be >= 257 (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


# ------------------------------------------------------------------------------------------- training


@dataclass
class TeacherConfig:
    """Hyper-parameters of `train_teacher` (the CLI flags of `kronsearch teacher train`)."""

    vocab_size: int = 8192
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_positions: int | None = None  # defaults to seq_len
    seq_len: int = 128
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    dropout: float = 0.0
    grad_clip: float = 1.0
    max_steps: int = 2000
    max_minutes: float | None = None
    eval_every: int = 100
    eval_blocks: int = 256  # validation blocks used for model selection during training
    valid_fraction: float = 0.05  # held out from a single-file corpus that has no valid split
    seed: int = 0
    threads: int | None = None
    config_name: str | None = None  # datasets-hub config when --data is a hub name
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if (self.n_positions or self.seq_len) < self.seq_len:
            raise ConfigError(f"n_positions ({self.n_positions}) must be >= seq_len ({self.seq_len})")
        for name in ("n_layer", "n_embd", "n_head", "seq_len", "batch_size", "max_steps", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"max_minutes must be > 0, got {self.max_minutes}")


def lr_at(progress: float, step: int, cfg: TeacherConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr as `progress` (0..1) runs out."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


def evaluate_lm(model, blocks, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats per token) of `model` on `blocks`."""
    import torch

    from trials.data import lm_batches

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in lm_batches(blocks, batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total += loss.item()
            count += batch[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1)


def _split_blocks(source, tokenizer, cfg: TeacherConfig, cache_dir):
    """train/valid/test blocks; a single file without splits gets a held-out tail as valid (and no test)."""
    from trials.data import load_text_blocks

    kw = dict(config_name=cfg.config_name, cache_dir=cache_dir)
    path = Path(source).expanduser()
    if path.is_file():
        blocks = load_text_blocks(source, tokenizer, cfg.seq_len, "train", **kw)
        n_valid = max(1, int(len(blocks) * cfg.valid_fraction))
        if len(blocks) - n_valid < 1:
            raise DataError(f"{source} has only {len(blocks)} blocks of {cfg.seq_len} tokens: too few to train")
        return blocks[:-n_valid], blocks[-n_valid:], None
    train = load_text_blocks(source, tokenizer, cfg.seq_len, "train", **kw)
    valid = load_text_blocks(source, tokenizer, cfg.seq_len, "valid", **kw)
    try:
        test = load_text_blocks(source, tokenizer, cfg.seq_len, "test", **kw)
    except DataError:
        test = None
    return train, valid, test


def train_teacher(
    data: str | os.PathLike,
    out: str | os.PathLike,
    cfg: TeacherConfig | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train a tokenizer and a GPT-2 from scratch on `data`; save the best-validation model to `out`.

    Returns a summary dict (parameters, steps, time, valid/test loss and perplexity per BPE token).
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from trials.data import iter_texts, lm_batches

    cfg = cfg or TeacherConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(out)
    t_start = time.time()

    texts = iter_texts(data, "train", config_name=cfg.config_name, cache_dir=cache_dir)
    if not texts:
        raise DataError(f"the train split of {data} has no non-blank text")
    log(f"training a {cfg.vocab_size}-token byte-level BPE on {len(texts)} train records")
    tokenizer = train_bpe_tokenizer(texts, cfg.vocab_size)
    del texts
    train, valid, test = _split_blocks(data, tokenizer, cfg, cache_dir)
    log(f"blocks of {cfg.seq_len}: train {len(train)}, valid {len(valid)}, test {0 if test is None else len(test)}")

    eos = tokenizer.eos_token_id
    model_cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_positions or cfg.seq_len,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    model = GPT2LMHeadModel(model_cfg)
    tokenizer.model_max_length = model_cfg.n_positions
    n_params = sum(p.numel() for p in model.parameters())
    log(f"GPT-2 with {n_params:,} parameters ({cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.n_head} heads)")

    # no weight decay on biases, LayerNorms and embeddings' 1-d parameters (nanoGPT's split)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    eval_valid = valid[: cfg.eval_blocks]
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
    best = {"loss": float("inf"), "step": 0, "state": None}
    history = []
    step, epoch, train_start = 0, 0, time.time()
    model.train()

    def progress() -> float:
        p = step / cfg.max_steps
        if budget_s:
            p = max(p, (time.time() - train_start) / budget_s)
        return p

    def maybe_keep(loss: float):
        if loss < best["loss"]:
            best.update(loss=loss, step=step, state=copy.deepcopy(model.state_dict()))

    done = False
    while not done:
        drop_last = len(train) >= cfg.batch_size  # equal-sized steps, unless the corpus is smaller than a batch
        for batch in lm_batches(train, cfg.batch_size, shuffle=True, seed=cfg.seed + epoch, drop_last=drop_last):
            lr = lr_at(progress(), step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            done = step >= cfg.max_steps or (budget_s is not None and time.time() - train_start >= budget_s)
            if step % cfg.eval_every == 0 or done:
                v = evaluate_lm(model, eval_valid, cfg.batch_size)
                maybe_keep(v)
                elapsed = time.time() - train_start
                history.append({"step": step, "train_loss": round(loss.item(), 4), "valid_loss": round(v, 4)})
                log(
                    f"step {step:5d} | epoch {epoch} | lr {lr:.2e} | train loss {loss.item():.4f} | "
                    f"valid loss {v:.4f} (ppl {math.exp(v):.1f}) | {elapsed / 60:.1f} min"
                )
            if done:
                break
        epoch += 1

    train_minutes = (time.time() - train_start) / 60
    model.load_state_dict(best["state"])
    log(f"best valid subset loss {best['loss']:.4f} at step {best['step']}; evaluating on the full splits")
    valid_loss = evaluate_lm(model, valid, cfg.batch_size)
    test_loss = evaluate_lm(model, test, cfg.batch_size) if test is not None else None

    summary = {
        "parameters": n_params,
        "steps": step,
        "best_step": best["step"],
        "epochs": round(step * cfg.batch_size / max(len(train), 1), 3),
        "train_minutes": round(train_minutes, 2),
        "total_minutes": round((time.time() - t_start) / 60, 2),
        "valid_loss": round(valid_loss, 4),
        "valid_ppl": round(math.exp(valid_loss), 2),
        "test_loss": None if test_loss is None else round(test_loss, 4),
        "test_ppl": None if test_loss is None else round(math.exp(test_loss), 2),
        "valid_tokens": int(valid.numel()),
        "test_tokens": None if test is None else int(test.numel()),
    }
    with atomic_dir(out) as tmp:  # a run killed while saving leaves the previous teacher (or nothing), not half of one
        save_model_dir(model, tokenizer, tmp)
        _portable_tokenizer_class(tmp)
        atomic_write_text(tmp / "MODEL_CARD.md", _lm_card(data, cfg, summary, command or _command_line(), history))
    return summary


def save_model_dir(model, tokenizer, out: str | os.PathLike) -> None:
    """save_pretrained with safetensors weights only, plus the tokenizer (into `out` directly: callers that replace
    a teacher wrap it in `kron.fsutil.atomic_dir`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # transformers >= 5 always writes model.safetensors
    for stale in out.glob("pytorch_model*.bin"):
        stale.unlink()
    tokenizer.save_pretrained(out)


def _portable_tokenizer_class(out: Path) -> None:
    """Name the generic fast-tokenizer class that transformers 4.x also knows (5.x writes "TokenizersBackend")."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        atomic_write_text(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("kronsearch", "cli.py", "__main__.py")):
        argv[0] = "kronsearch"
    return shlex.join(argv)


def _machine() -> str:
    import torch

    return f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def _lm_card(data, cfg: TeacherConfig, summary: dict, command: str, history: list[dict]) -> str:
    hp = {k: v for k, v in asdict(cfg).items() if k != "extra"}
    rows = "\n".join(f"| {h['step']} | {h['train_loss']} | {h['valid_loss']} |" for h in history[-10:])
    test = (
        f"{summary['test_ppl']} (loss {summary['test_loss']}, {summary['test_tokens']:,} tokens)"
        if summary["test_ppl"] is not None
        else "n/a (no test split)"
    )
    return f"""# Small GPT-2 teacher

A GPT-2 (`GPT2LMHeadModel`) trained from scratch by `kronsearch teacher train`, with its own byte-level BPE
tokenizer (vocabulary {cfg.vocab_size}, `{EOS_TOKEN}` as BOS/EOS/PAD) trained on the same corpus.

- Data: `{data}` (train split for training and the tokenizer; valid split for model selection)
- Parameters: {summary['parameters']:,}
- Layers / width / heads / positions: {cfg.n_layer} / {cfg.n_embd} / {cfg.n_head} / {cfg.n_positions or cfg.seq_len}
- Training: {summary['steps']} steps of {cfg.batch_size} x {cfg.seq_len} tokens ({summary['epochs']} epochs),
  best checkpoint at step {summary['best_step']}, {summary['train_minutes']} min of training on {_machine()}

## Evaluation

Perplexity per BPE token **of this tokenizer** (not comparable to word-level perplexities), on
non-overlapping blocks of {cfg.seq_len} tokens:

- valid: {summary['valid_ppl']} (loss {summary['valid_loss']}, {summary['valid_tokens']:,} tokens)
- test: {test}

## Command

```
{command}
```

## Hyper-parameters

```json
{json.dumps(hp, indent=2)}
```

## Last evaluations

| step | train loss | valid loss (first {cfg.eval_blocks} blocks) |
|---|---|---|
{rows}
"""


# ------------------------------------------------------------------------------------------ fine-tuning


@dataclass
class FinetuneConfig:
    """Hyper-parameters of `finetune_teacher` (the CLI flags of `kronsearch teacher finetune`)."""

    epochs: float = 3.0
    lr: float = 5e-5
    batch_size: int = 32
    eval_batch_size: int = 64
    max_len: int = 128
    max_steps: int | None = None
    max_minutes: float | None = None
    max_train_examples: int | None = None
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    threads: int | None = None

    def __post_init__(self):
        if self.epochs <= 0 or self.batch_size < 1 or self.max_len < 2:
            raise ConfigError(
                f"need epochs > 0, batch_size >= 1, max_len >= 2; got {self.epochs}, {self.batch_size}, {self.max_len}"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")


def load_classifier(model_src: str | os.PathLike, task):
    """(model, tokenizer) for sequence classification on `task`, with a pad token set (GPT-2 has none)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trials.glue import get_task

    spec = get_task(task)
    src = str(model_src)
    if Path(src).expanduser().exists() and not (Path(src).expanduser() / "config.json").is_file():
        raise CheckpointError(f"{src} is not a model directory: config.json is missing")
    tokenizer = AutoTokenizer.from_pretrained(src)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CheckpointError(f"the tokenizer of {src} has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if Path(src).expanduser().is_dir():
        from kron.models import check_weights

        check_weights(Path(src).expanduser())  # safetensors only: a pytorch_model.bin is refused, never unpickled
    kwargs = {"num_labels": spec.num_labels, "use_safetensors": True}
    if spec.is_regression:
        kwargs["problem_type"] = "regression"
    else:
        kwargs["problem_type"] = "single_label_classification"
        kwargs["id2label"] = dict(enumerate(spec.labels))
        kwargs["label2id"] = {name: i for i, name in enumerate(spec.labels)}
    model = AutoModelForSequenceClassification.from_pretrained(src, **kwargs)
    if model.config.pad_token_id is None:  # GPT-2 finds each sequence's last token through pad_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def evaluate_classifier(model, tokenizer, examples, task, *, max_len: int = 128, batch_size: int = 64) -> dict:
    """The task's GLUE metrics of `model` on `examples`."""
    import torch

    from trials.glue import encode_glue, get_task, glue_metrics

    spec = get_task(task)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds, golds = [], []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = encode_glue(examples[start : start + batch_size], tokenizer, max_len)
            labels = batch.pop("labels")
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
            preds.append(logits[:, 0] if spec.is_regression else logits.argmax(-1))
            golds.append(labels)
    model.train(was_training)
    return glue_metrics(spec, torch.cat(preds), torch.cat(golds))


def finetune_teacher(
    model_src: str | os.PathLike,
    task: str,
    out: str | os.PathLike,
    cfg: FinetuneConfig | None = None,
    *,
    data: str | os.PathLike | None = None,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Fine-tune `model_src` for GLUE `task` (data: a GLUE TSV directory, or None for the hub), save to `out`.

    Evaluates on the dev split with the task's metrics and returns a summary dict.
    """
    import torch

    from trials.glue import encode_glue, get_task, load_glue, main_metric

    cfg = cfg or FinetuneConfig()
    spec = get_task(task)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train = load_glue(spec, data, "train", max_examples=cfg.max_train_examples)
    dev = load_glue(spec, data, "dev")
    model, tokenizer = load_classifier(model_src, spec)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{spec.name}: {len(train)} train / {len(dev)} dev examples; {type(model).__name__}, {n_params:,} parameters")

    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warmup = int(cfg.warmup_ratio * total)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
    step, epoch, t0 = 0, 0, time.time()
    model.train()
    while step < total:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        for start in range(0, len(order), cfg.batch_size):
            batch = encode_glue([train[i] for i in order[start : start + cfg.batch_size]], tokenizer, cfg.max_len)
            lr = cfg.lr * ((step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup)))
            for group in opt.param_groups:
                group["lr"] = lr
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            if step % 50 == 0 or step == total:
                minutes = (time.time() - t0) / 60
                log(f"step {step}/{total} | epoch {epoch} | lr {lr:.2e} | loss {loss.item():.4f} | {minutes:.1f} min")
            if step >= total or (budget_s is not None and time.time() - t0 >= budget_s):
                total = step  # a time budget ends training early
                break
        epoch += 1
    train_minutes = (time.time() - t0) / 60

    metrics = evaluate_classifier(model, tokenizer, dev, spec, max_len=cfg.max_len, batch_size=cfg.eval_batch_size)
    name, direction = main_metric(spec)
    log(f"dev: {json.dumps(metrics)}")
    summary = {
        "task": spec.name,
        "parameters": n_params,
        "train_examples": len(train),
        "dev_examples": len(dev),
        "steps": step,
        "train_minutes": round(train_minutes, 2),
        "dev": metrics,
        "main_metric": name,
        "main_metric_direction": direction,
        "main_metric_value": metrics[name],
    }
    with atomic_dir(out) as tmp:  # a run killed while saving leaves the previous teacher (or nothing), not half of one
        save_model_dir(model, tokenizer, tmp)
        atomic_write_text(tmp / "eval_results.json", json.dumps(summary, indent=2) + "\n")
        atomic_write_text(tmp / "MODEL_CARD.md", _finetune_card(model_src, spec, data, cfg, summary,
                                                                command or _command_line()))
    return summary


def _finetune_card(model_src, spec, data, cfg: FinetuneConfig, summary: dict, command: str) -> str:
    metrics = "\n".join(f"- {k}: {v:.4f}" for k, v in summary["dev"].items())
    return f"""# {spec.name} teacher

`{model_src}` fine-tuned for GLUE {spec.name} ({'regression' if spec.is_regression else f'{spec.num_labels} classes'})
by `kronsearch teacher finetune`.

- Data: {data or 'the `glue` dataset of the datasets hub'} ({summary['train_examples']} train examples)
- Training: {summary['steps']} steps of batch {cfg.batch_size}, max length {cfg.max_len}, lr {cfg.lr},
  {summary['train_minutes']} min on {_machine()}

## Dev results ({summary['dev_examples']} examples; main metric: {summary['main_metric']})

{metrics}

## Command

```
{command}
```

## Hyper-parameters

```json
{json.dumps(asdict(cfg), indent=2)}
```
"""
