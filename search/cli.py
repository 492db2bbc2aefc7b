"""The `kronsearch` console script: one parser, subcommands contributed by each package.

Each command module exposes `add_parsers(subparsers)` (the model commands — shapes, plan, compress, merge, profile —
live in search/ because with calibration data and heat maps they use trials and analysis as well as kron); handlers import their heavy dependencies lazily so
`kronsearch --help` stays fast. A `UserError` (or a missing file) exits 2 with one line and no traceback; any
other exception exits 1.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Packages contributing subcommands, in the order they appear in --help.
_COMMAND_MODULES = ("search.model_commands", "trials.cli", "trials.commands", "search.commands", "analysis.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kronsearch",
        description="Find the best way to compress a pre-trained Transformer: Kronecker factors, low-rank, structured "
                    "pruning and 8/4-bit weights per matrix, automatic plans from sensitivity profiles, and a Ray "
                    "Tune + Optuna search over plans.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a package not written yet must not break the others
            if exc.name != name:
                raise
            continue
        module.add_parsers(sub)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("kronsearch")
    except Exception:  # running from a source tree that was never installed
        return "unknown"


# an error line's length at most: whatever the input echoed into a message, the user gets one readable line
MAX_MESSAGE = 2000


_AFTER_FULL = {  # what a full disk left behind, by command: folders are written aside and swapped in whole
    "search": "free space and run it again (with --resume once trials have started: the finished ones are kept)",
    None: "nothing was left half-written; free space and run it again",
}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' per-call advice (attention masks, loss_type) would drown the progress lines; errors still show
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # "Loading weights" bars, one per model load
    _quiet_if_imported()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # "Generating data split" bars
    parser = build_parser()
    args = parser.parse_args(argv)
    from analysis.textfmt import one_line
    from kron.errors import UserError

    try:
        rc = args.func(args)
    except (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        print(f"kronsearch {args.command}: error: {one_line(exc, limit=MAX_MESSAGE)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kronsearch {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # internal error: keep it short, point at the traceback switch
        from kron.errors import disk_full

        full = disk_full(exc)
        if full is not None:  # the machine's fault, not ours: the user's to fix
            print(f"kronsearch {args.command}: error: the disk is full: {one_line(full, limit=400)}; "
                  f"{_AFTER_FULL.get(args.command, _AFTER_FULL[None])}", file=sys.stderr)
            return 2
        if os.environ.get("KRONSEARCH_TRACEBACK"):
            raise
        print(
            f"kronsearch {args.command}: internal error: {type(exc).__name__}: {one_line(exc, limit=MAX_MESSAGE)} "
            "(set KRONSEARCH_TRACEBACK=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    return int(rc or 0)


def _quiet_if_imported() -> None:
    """The environment switches above act at import: when main() runs in a process that imported transformers
    already (tests, notebooks), apply them through the libraries too, so an error stays one line."""
    if "transformers" in sys.modules and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            if os.environ.get("TRANSFORMERS_VERBOSITY") == "error":
                hf_logging.set_verbosity_error()
        except Exception:  # an older or newer transformers without these: cosmetic only
            pass


if __name__ == "__main__":
    sys.exit(main())
