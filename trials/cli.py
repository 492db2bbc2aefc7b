"""`kronsearch teacher ...`: train a small GPT-2 teacher from scratch, fine-tune a teacher on a GLUE task."""
from __future__ import annotations

import argparse
import json


def add_parsers(subparsers) -> None:
    teacher = subparsers.add_parser("teacher", help="train or fine-tune a teacher model")
    sub = teacher.add_subparsers(dest="teacher_command", metavar="SUBCOMMAND")
    sub.required = True

    train = sub.add_parser(
        "train",
        help="train a byte-level BPE tokenizer and a small GPT-2 from scratch on a text corpus",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train.add_argument("--data", required=True, help="text file, directory with train/valid/test files, or hub name")
    train.add_argument("--data-config", default=None, help="datasets-hub config name (e.g. wikitext-103-raw-v1)")
    train.add_argument("--out", required=True, help="output model directory")
    train.add_argument("--vocab-size", type=int, default=8192)
    train.add_argument("--n-layer", type=int, default=4)
    train.add_argument("--n-embd", type=int, default=256)
    train.add_argument("--n-head", type=int, default=4)
    train.add_argument("--n-positions", type=int, default=None, help="position embeddings (default: --seq-len)")
    train.add_argument("--seq-len", type=int, default=128)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--warmup-steps", type=int, default=100)
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument("--dropout", type=float, default=0.0)
    train.add_argument("--max-steps", type=int, default=2000)
    train.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget of the training loop")
    train.add_argument("--eval-every", type=int, default=100)
    train.add_argument("--eval-blocks", type=int, default=256, help="valid blocks used for model selection")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    train.add_argument(
        "--cache-dir", default=None, help="token cache (default: $KRONSEARCH_CACHE or ~/.cache/kronsearch)"
    )
    train.set_defaults(func=_train)

    ft = sub.add_parser(
        "finetune",
        help="fine-tune a teacher for sequence classification on a GLUE task",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ft.add_argument("--model", required=True, help="local model directory (or hub name, needs network)")
    ft.add_argument("--task", required=True, help="GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli")
    ft.add_argument("--data", default=None, help="directory with the task's train.tsv/dev.tsv (default: hub 'glue')")
    ft.add_argument("--out", required=True, help="output model directory")
    ft.add_argument("--epochs", type=float, default=3.0)
    ft.add_argument("--lr", type=float, default=5e-5)
    ft.add_argument("--batch-size", type=int, default=32)
    ft.add_argument("--max-len", type=int, default=128)
    ft.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    ft.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget of the training loop")
    ft.add_argument("--max-train-examples", type=int, default=None)
    ft.add_argument("--warmup-ratio", type=float, default=0.06)
    ft.add_argument("--weight-decay", type=float, default=0.01)
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ft.set_defaults(func=_finetune)


def _train(args) -> int:
    from trials.teacher import TeacherConfig, train_teacher

    cfg = TeacherConfig(
        vocab_size=args.vocab_size,
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
        n_positions=args.n_positions,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        dropout=args.dropout,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        eval_every=args.eval_every,
        eval_blocks=args.eval_blocks,
        seed=args.seed,
        threads=args.threads,
        config_name=args.data_config,
    )
    summary = train_teacher(args.data, args.out, cfg, cache_dir=args.cache_dir, log=_log)
    print(json.dumps({"out": args.out, **summary}), flush=True)
    return 0


def _finetune(args) -> int:
    from trials.teacher import FinetuneConfig, finetune_teacher

    cfg = FinetuneConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_len=args.max_len,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        max_train_examples=args.max_train_examples,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        seed=args.seed,
        threads=args.threads,
    )
    summary = finetune_teacher(args.model, args.task, args.out, cfg, data=args.data, log=_log)
    print(json.dumps({"out": args.out, **summary}), flush=True)
    return 0


def _log(message: str) -> None:
    print(message, flush=True)
