"""`kronsearch trial CONFIG.yaml` and `kronsearch eval --model SRC ...` (heavy imports inside the handlers)."""
from __future__ import annotations

import argparse
import json


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "trial", help="run one trial: compress, distil, evaluate (one JSON summary)",
        description="Run one trial from a YAML config: load the teacher, build the plan, SVD init, ILKD stage(s) "
                    "with evaluation every k steps and early stopping; prints one JSON summary at the end.")
    p.add_argument("config", help="trial config (YAML or JSON)")
    p.add_argument("--out", default=None, help="output folder for trial_summary.json and the best checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set stage1.max_steps=20 (YAML value syntax)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_trial)

    e = subparsers.add_parser(
        "eval", help="perplexity, GLUE or lm-eval metrics of any model (teacher, compressed or merged directory)",
        description="Evaluate a model: WikiText-style perplexity on a text source, a GLUE task's metrics, or "
                    "lm-evaluation-harness tasks (the optional extra lm-eval).")
    e.add_argument("--model", required=True, help="'demo', a model directory (plain, compressed or merged), a hub "
                                                   "name")
    e.add_argument("--data", default=None, help="text source for perplexity: a file, a folder with "
                                                "train/valid/test files, or a datasets-hub name")
    e.add_argument("--config-name", default=None, help="datasets-hub config, e.g. wikitext-103-raw-v1")
    e.add_argument("--split", default=None, help="valid or test (blocks: default valid; gptq: test); GLUE: dev")
    e.add_argument("--protocol", choices=("blocks", "gptq"), default="blocks",
                   help="perplexity protocol: blocks (the project's: lines + EOS cut into --seq-len blocks; default) "
                        "or gptq (papers': the raw test split joined with blank lines, one stream, windows of the "
                        "model's context; --data wikitext2, c4, NAME:PATH or a path)")
    e.add_argument("--seq-len", type=int, default=None,
                   help="tokens per block/window (blocks: default 128; gptq: the model's context, at most 2048)")
    e.add_argument("--max-blocks", type=int, default=None, help="evaluate on the first N blocks/windows only")
    e.add_argument("--glue-task", default=None, help="evaluate a classifier on this GLUE task instead")
    e.add_argument("--glue-data", default="glue", help="GLUE folder in the TSV layout, or 'glue' (the hub)")
    e.add_argument("--max-len", type=int, default=128)
    e.add_argument("--lm-eval", default=None, metavar="TASKS",
                   help="lm-evaluation-harness tasks instead, comma-separated: arc_easy,hellaswag,piqa,winogrande")
    e.add_argument("--limit", type=int, default=None, metavar="N", help="lm-eval: the first N examples of each task")
    e.add_argument("--lm-eval-include", default=None, metavar="DIR",
                   help="lm-eval: folder of extra task YAMLs (local tasks, offline)")
    e.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples (default: each task's)")
    e.add_argument("--tokenizer", default=None, help="tokenizer source when the model folder has none")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=_eval)


def _apply_overrides(data: dict, overrides: list[str]) -> dict:
    import yaml

    from kron.errors import ConfigError

    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def _trial(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kron.vocab import SUMMARY_NAME

    from .config import read_yaml_mapping
    from .trial import run_trial

    path = Path(args.config)
    data = _apply_overrides(read_yaml_mapping(path, "trial settings", empty_ok=True), args.set)
    out = args.out or str(Path("runs") / "trials" / (data.get("name") or path.stem))
    summary = run_trial(data, output_dir=out, progress=not args.no_progress)
    brief = {k: v for k, v in summary.items() if k not in ("history", "config", "plan", "plan_resolved", "init_errors")}
    brief["summary_path"] = str(Path(out) / SUMMARY_NAME)
    print(json.dumps(brief, default=str))
    return 0 if summary["status"] == "complete" else 1


def _eval(args: argparse.Namespace) -> int:
    from kron.errors import ConfigError
    from kron.models import load_model, load_tokenizer, pick_device, resolve_source
    from kron.surgery import count_params

    from .evaluate import evaluate_glue, evaluate_lm

    if args.protocol == "gptq" and (args.glue_task or args.lm_eval):
        raise ConfigError("--protocol gptq is a perplexity protocol: give it --data (wikitext2, c4, NAME:PATH or a "
                          "path), not --glue-task or --lm-eval")
    if args.protocol == "gptq" and args.data is None:
        args.data = "wikitext2"  # the convention's corpus (the datasets hub, or its cache)
    if sum(a is not None for a in (args.data, args.glue_task, args.lm_eval)) != 1:
        raise ConfigError("give exactly one of --data (perplexity), --glue-task (GLUE metric) or --lm-eval (harness "
                          "tasks)")
    if args.lm_eval is not None:  # lm-eval installed and the tasks known, before the model is loaded
        from .harness import check_tasks, split_tasks

        check_tasks(split_tasks(args.lm_eval), args.lm_eval_include)
    device = pick_device(args.device)
    src = resolve_source(args.model)
    task = "sequence-classification" if args.glue_task else "causal-lm"
    model = load_model(src, task=task, device=device)
    model.eval()
    tokenizer = load_tokenizer(resolve_source(args.tokenizer) if args.tokenizer else src)
    if args.data is not None and args.protocol == "gptq":
        from .protocol import evaluate_gptq

        result = {"model": args.model, **evaluate_gptq(model, tokenizer, args.data, seq_len=args.seq_len,
                                                       batch_size=args.batch_size, device=device,
                                                       split=args.split or "test", max_windows=args.max_blocks)}
    elif args.data is not None:
        from .data import load_text_blocks

        seq_len, split = args.seq_len or 128, args.split or "valid"
        blocks = load_text_blocks(args.data, tokenizer, seq_len, split, config_name=args.config_name)
        if args.max_blocks:
            blocks = blocks[: args.max_blocks]
        metrics = evaluate_lm(model, blocks, args.batch_size, device)
        # non-overlapping blocks of one stream of lines + EOS: a context and stride of seq_len, as stated
        result = {"model": args.model, "protocol": "blocks", "data": args.data, "split": split, "seq_len": seq_len,
                  "context": seq_len, "stride": seq_len, "blocks": int(blocks.shape[0]),
                  "perplexity": metrics["quality"], "nll": metrics["val_nll"],
                  "throughput_tokens_per_s": metrics["throughput_tokens_per_s"]}
    elif args.lm_eval is not None:
        from .harness import run_harness

        result = {"model": args.model, **run_harness(
            model, tokenizer, args.lm_eval, limit=args.limit, batch_size=args.batch_size, device=device,
            include_path=args.lm_eval_include, num_fewshot=args.num_fewshot)}
    else:
        from .glue import encode_glue, load_glue

        split = "dev" if args.split in (None, "valid") else args.split
        examples = load_glue(args.glue_task, args.glue_data, split)
        data = encode_glue(examples, tokenizer, args.max_len)
        metrics = evaluate_glue(model, data, args.glue_task, args.batch_size, device)
        result = {"model": args.model, "task": args.glue_task, "split": split, "examples": len(examples),
                  **{k.removeprefix("glue_"): v for k, v in metrics.items() if k.startswith("glue_")},
                  "throughput_tokens_per_s": metrics["throughput_tokens_per_s"]}
    result["params"] = count_params(model)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in _flat(result).items():
            if isinstance(v, str) and not v.isprintable():
                v = json.dumps(v)  # the gptq joiner "\n\n": shown, not printed as blank lines
            print(f"{k:>24s}: {v:.4f}" if isinstance(v, float) else f"{k:>24s}: {v}")
    return 0


def _flat(result: dict, prefix: str = "") -> dict:
    """Nested results (lm-eval's per-task metrics) as one level of "task.metric" keys, for the text output."""
    out = {}
    for k, v in result.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
