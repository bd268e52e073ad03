"""Generated blocks in the docs: a table between two marker lines, rewritten from a run's JSON so
that a reader can rerun a benchmark and diff the doc.

A block is `<!-- bench NAME: begin -->`, the text a bench's renderer makes from its JSON, and
`<!-- bench NAME: end -->`; tests/bench/test_doc_tables.py re-renders every block in docs/ from
its committed JSON and checks the doc holds exactly that."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    """The begin and end lines of the block `name` (`lorafleet bench NAME`'s own block)."""
    return f"<!-- bench {name}: begin -->", f"<!-- bench {name}: end -->"


def block(name: str, body: str) -> str:
    """`body` between the markers of `name`, one marker line above and one below."""
    begin, end = markers(name)
    return f"{begin}\n{body.strip(chr(10))}\n{end}"


def replace_block(path: Path, begin: str, end: str, block: str) -> None:
    """Write `block` (which starts with `begin` and ends with `end`) in place of the text between
    those markers in `path`, or append it when the markers are absent."""
    text = path.read_text() if path.is_file() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def write_block(path: Path, name: str, body: str) -> None:
    """Replace (or append) the block `name` of the doc `path` with `body`."""
    replace_block(path, *markers(name), block(name, body))


# namespace entries that are not measurement settings (the CLI's own, and output paths)
_NOT_SETTINGS = {"func", "progress", "no_progress", "verbose", "command", "benchmark",
                 "update_doc", "from_json"}


def command_line(name: str, args=None) -> str:
    """`lorafleet bench NAME` with the arguments this run was given, less --update-doc (where
    the table went does not change what was measured). Called in-process rather than from the
    command line (tests, scripts), the parsed settings `args` stand in for the arguments."""
    if sys.argv[1:3] == ["bench", name]:
        argv = sys.argv[3:]
        if "--update-doc" in argv:
            i = argv.index("--update-doc")
            argv = argv[:i] + argv[i + 2:]
        return " ".join([f"lorafleet bench {name}", *argv])
    settings = {k: v for k, v in sorted(vars(args or {}).items()) if k not in _NOT_SETTINGS}
    return (f"lorafleet bench {name} (called in-process: "
            + ", ".join(f"{k}={v}" for k, v in settings.items()) + ")")


def cpu_name() -> str:
    """The CPU model (/proc/cpuinfo's "model name"), else platform.processor()."""
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return cpu


def write_json(path: Path, data, indent: int) -> None:
    """A bench's results as the JSON its doc block is re-rendered from (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent) + "\n")


def run_info(command: str) -> dict:
    """Where and when a measurement ran, kept in its JSON so the doc can say so: the command,
    UTC time, commit, CPU model and count, torch version, load average at the start."""
    import torch

    cpu = cpu_name()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:  # no git: the JSON says so rather than failing the run
        commit = ""
    return {"command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit or "unknown", "cpu": cpu or "unknown", "cpus": os.cpu_count(),
            "torch": torch.__version__, "load_average_start": round(os.getloadavg()[0], 1)}


def run_ended(info: dict) -> dict:
    """`info` of run_info with the load average at the measurement's end added."""
    return dict(info, load_average_end=round(os.getloadavg()[0], 1))


def run_line(info: dict) -> str:
    """One sentence naming the run of `run_info`, with the load average at its end if known."""
    load = f"load average {info['load_average_start']}"
    if info.get("load_average_end") is not None:
        load += f" -> {info['load_average_end']}"
    return (f"Command: `{info['command']}`; run of {info['date']} at commit {info['commit']} on "
            f"{info['cpu']} ({info['cpus']} CPUs, shared with other jobs), torch "
            f"{info['torch']}, {load}.")
