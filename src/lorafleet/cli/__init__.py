"""`lorafleet`: one command, a subcommand per job. Parse, call the library, render.

Each job lives in its own module under `lorafleet.cli` exposing `add_parser(subparsers)`;
the module's parser sets `func` to the function that runs it.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lorafleet.errors import LoraFleetError

# Subcommand modules, in the order `lorafleet --help` lists them.
COMMANDS = [
    "generate", "train", "serve", "merge", "adapters", "quantize", "bench", "analyze", "demo",
    "pretrain",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafleet",
        description="Low-rank adaptation of LLMs: train adapters (LoRA, QLoRA), keep them in "
                    "PEFT format, merge them, and serve thousands at once over one base model.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="JOB")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"lorafleet.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"lorafleet.cli.{name}":
                continue  # job not built yet
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except LoraFleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
