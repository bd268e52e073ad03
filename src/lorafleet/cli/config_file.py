"""`--config FILE` for any job: a YAML, TOML or JSON mapping of the job's flags (spelled as on
the command line without the dashes, `-` or `_` alike: `max-loras: 4`, `max_num_seqs: 32`) that
becomes the job's defaults, so the command line still overrides each one.

    lorafleet serve --config serve.yaml --port 9000

A key that is not a flag of the job is an error naming it (and the closest flag); a value is
converted by the flag's own type, as if typed on the command line.
"""
from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path
from typing import Any

from lorafleet.errors import ConfigError


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A mapping from a .yaml/.yml, .toml or .json file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ModuleNotFoundError as exc:
                raise ConfigError(f"--config {path}: reading YAML needs pyyaml "
                                  "(pip install pyyaml), or write the file as TOML or JSON"
                                  ) from exc
            data = yaml.safe_load(text)
        elif suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"--config {path}: unknown format {suffix or '(no suffix)'!r}; "
                              "use .yaml, .toml or .json")
    except ConfigError:
        raise
    except Exception as exc:  # each parser has its own error type; all mean a malformed file
        raise ConfigError(f"--config {path}: cannot parse: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values, got "
                          f"{type(data).__name__}")
    return data


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _job(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser | None:
    jobs = getattr(parser, "jobs", {})
    for arg in argv:
        if arg in jobs:
            return jobs[arg]
    return None


def _convert(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """The value as the flag would hold it had it been typed (type, choices, repeats)."""
    def one(item):
        if action.type is not None and isinstance(item, str):
            try:
                item = action.type(item)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                raise ConfigError(f"--config {path}: {key}: {exc}") from exc
        elif action.type in (int, float) and not isinstance(item, bool) \
                and isinstance(item, (int, float)):
            item = action.type(item)
        if action.choices is not None and item not in action.choices:
            raise ConfigError(f"--config {path}: {key}: {item!r} is not one of "
                              f"{sorted(map(str, action.choices))}")
        return item

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"--config {path}: {key} is a switch: true or false, got "
                              f"{value!r}")
        # store_false flags (--no-x) keep the positive meaning under their dest's name
        return value if action.dest == _name(key) or \
            isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(action, (argparse._AppendAction, argparse._ExtendAction)) or action.nargs in (
            "+", "*"):
        items = value if isinstance(value, list) else [value]
        return [one(item) for item in items]
    if isinstance(value, (list, dict)):
        raise ConfigError(f"--config {path}: {key} takes one value, got {value!r}")
    return one(value)


def _name(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_")


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """If argv names a job and `--config FILE`, make the file's values that job's defaults."""
    job = _job(parser, argv)
    path = _config_path(argv)
    if job is None or path is None:
        return
    if not any("--config" in a.option_strings for a in job._actions):
        return
    by_dest: dict[str, argparse.Action] = {}
    by_flag: dict[str, argparse.Action] = {}
    for action in job._actions:
        if action.dest in ("help", "version", "config") or not action.option_strings:
            continue
        by_dest.setdefault(action.dest, action)
        for flag in action.option_strings:
            if flag.startswith("--"):
                by_flag[_name(flag)] = action
    values = read_config_file(path)
    normalize = getattr(job, "normalize_config", None)   # a job's own spellings (train: TRL's)
    if normalize is not None:
        values = normalize(values, f"--config {path}")
    defaults = {}
    for key, value in values.items():
        name = _name(str(key))
        action = by_flag.get(name) or by_dest.get(name)
        if action is None:
            close = difflib.get_close_matches(name, sorted(set(by_flag) | set(by_dest)), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"--config {path}: {key!r} is not an option of "
                              f"`{job.prog}`{hint}")
        defaults[action.dest] = _convert(action, str(key), value, path)
        action.required = False           # given by the file; the command line may override
    job.set_defaults(**defaults)
