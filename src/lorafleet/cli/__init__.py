"""`lorafleet`: one command, a subcommand per job. Parse, call the library, render.

Each job lives in its own module under `lorafleet.cli` exposing `add_parser(subparsers)`;
the module's parser sets `func` to the function that runs it. Global flags (`-v`) may come
before or after the job's name; `--config FILE` of a job (config_file.py) sets its defaults,
which the command line overrides; an unknown flag is answered with the closest known one.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import sys

from lorafleet.errors import LoraFleetError

# Subcommand modules, in the order `lorafleet --help` lists them.
COMMANDS = [
    "generate", "train", "serve", "merge", "adapters", "quantize", "bench", "analyze", "demo",
    "pretrain", "eval", "plot", "env",
]


# Optional packages (pyproject.toml extras) -> the extra that installs them.
EXTRAS = {"transformers": "bench", "peft": "bench", "accelerate": "bench",
          "matplotlib": "plots", "bitsandbytes": "cuda", "triton": "cuda", "pyarrow": "data",
          "datasets": "data", "tensorboard": "track", "wandb": "track"}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose "unrecognized arguments" error names the closest known flag."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            unknown = message.split(":", 1)[1].split()
            message = ("unrecognized arguments: "
                       + " ".join(redacted(unknown, option_strings(self)))
                       + suggestions(self, unknown))
        elif "invalid choice: '" in message:      # a mistyped job name or choice value
            given = message.split("invalid choice: '", 1)[1].split("'", 1)[0]
            known = message.rsplit("(choose from ", 1)[-1].rstrip(")").replace("'", "")
            close = difflib.get_close_matches(given, [c.strip() for c in known.split(",")], n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
        super().error(message)


SECRET_WORDS = ("key", "token", "secret", "password")


def redacted(unknown: list[str], known: list[str]) -> list[str]:
    """The unknown arguments with the value of a secret-looking flag masked (`--api-kee sk-...`:
    a word like key or token in it, or in the known flag it is closest to): an error message
    ends up in logs and terminal scrollback."""
    def looks_secret(flag: str) -> bool:
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        return any(w in name.lower() for name in [flag] + close for w in SECRET_WORDS)

    out, hide_next = [], False
    for arg in unknown:
        flag, eq, value = arg.partition("=")
        secret = arg.startswith("-") and looks_secret(flag)
        if (hide_next and not arg.startswith("-")) or arg.startswith("sk-"):   # OpenAI-style
            out.append("***")
        elif secret and eq:
            out.append(f"{flag}=***")
        else:
            out.append(arg)
        hide_next = secret and not eq
    return out


def vllm_spellings(argv: list[str]) -> list[str]:
    """`--max_loras 4` as `--max-loras 4`: vLLM's parser takes either spelling of a flag (our
    flags have no underscores). Arguments after a bare `--` are left alone."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        flag, eq, value = arg.partition("=")
        if flag.startswith("--") and "_" in flag:
            out[i] = flag.replace("_", "-") + eq + value
    return out


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings]


def suggestions(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """'; did you mean --x?' for each unknown flag with a close known one (difflib)."""
    known = option_strings(parser)
    hints = []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("-"):
            continue
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        if close:
            hints.append(f"{flag} -> did you mean {close[0]}?")
    return ("; " + "; ".join(hints)) if hints else ""


def _version() -> str:
    from lorafleet import __version__
    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="lorafleet",
        description="Low-rank adaptation of LLMs: train adapters (LoRA, QLoRA), keep them in "
                    "PEFT format, merge them, and serve thousands at once over one base model.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"lorafleet {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="JOB", parser_class=Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"lorafleet.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"lorafleet.cli.{name}":
                continue  # job not built yet
            raise
        module.add_parser(subparsers)
    parser.jobs = subparsers.choices          # name -> the job's parser
    for sub in subparsers.choices.values():
        # Global flags after the job's name too (`lorafleet serve ... -v`). SUPPRESS: a job's
        # namespace would otherwise reset the value given before the job's name.
        known = set(option_strings(sub))
        flags = [f for f in ("-v", "--verbose") if f not in known]
        if flags:
            sub.add_argument(*flags, dest="verbose", action="store_true",
                             default=argparse.SUPPRESS, help="debug logging")
        if "--version" not in known:
            sub.add_argument("--version", action="version", version=f"lorafleet {_version()}")
    return parser


def job_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The parser of the job `args` chose, down to a sub-job (`bench NAME`, `adapters ACTION`):
    the one whose flags an unknown flag is compared with."""
    current = parser.jobs.get(getattr(args, "command", None), parser)
    while True:
        subs = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        chosen = subs[0].choices.get(getattr(args, subs[0].dest, None) or "") if subs else None
        if chosen is None:
            return current
        current = chosen


def main(argv: list[str] | None = None) -> int:
    from lorafleet.cli.config_file import apply_config_file

    argv = vllm_spellings(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        apply_config_file(parser, argv)
    except LoraFleetError as exc:
        parser.error(str(exc))
    args, unknown = parser.parse_known_args(argv)
    if unknown:     # the job's own parser says it: its usage, its flags as suggestions
        job_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
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
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"error: `lorafleet {args.command}` needs {exc.name}, an optional dependency: "
              f"pip install 'lorafleet[{extra}]'", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
