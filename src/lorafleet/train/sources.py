"""Training data as users have it: files (JSONL, JSON, CSV, Parquet) and Hugging Face `datasets`
folders, in the layouts other tools write, turned into the three record shapes data.py reads:

    {"prompt", "completion"}    {"messages": [{"role", "content"}, ...]}    {"text"}

Layouts converted here:
    alpaca    {"instruction", "input", "output"}: Stanford Alpaca's prompt template (the one
              Axolotl's `type: alpaca` uses) -> prompt, output -> completion
    sharegpt  {"conversations": [{"from": "human"|"gpt"|"system", "value"}]} -> messages
and `columns` renames a file's columns to ours (`prompt=question,completion=answer`).

Parquet needs pyarrow and a `datasets` folder needs `datasets` (both optional: the error names the
package to install).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable, Iterator

from lorafleet.errors import ConfigError, DataError

RECORD_FORMATS = ("auto", "prompt", "messages", "text", "alpaca", "sharegpt")
TABLE_SUFFIXES = (".json", ".csv", ".parquet")

ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that "
                 "provides further context. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                 "### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                          "appropriately completes the request.\n\n### Instruction:\n"
                          "{instruction}\n\n### Response:\n")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system", "tool": "tool"}


def parse_columns(columns: str | None) -> dict[str, str]:
    """'prompt=question,completion=answer' -> {"question": "prompt", "answer": "completion"}."""
    mapping = {}
    for item in (columns or "").split(","):
        if not item.strip():
            continue
        ours, sep, theirs = item.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise ConfigError(f"columns: {item!r} is not OURS=THEIRS (e.g. prompt=question)")
        mapping[theirs.strip()] = ours.strip()
    return mapping


def converter(fmt: str, columns: str | None) -> Callable[[dict], dict]:
    """record -> one of our three shapes (a record in another layout is rewritten)."""
    if fmt not in RECORD_FORMATS:
        raise ConfigError(f"format must be one of {RECORD_FORMATS} (found {fmt!r})")
    rename = parse_columns(columns)

    def convert(record):
        if not isinstance(record, dict):
            return record  # check_record names the problem
        if rename:
            record = {rename.get(k, k): v for k, v in record.items()}
        layout = fmt if fmt != "auto" else detect(record)
        if layout == "alpaca":
            return from_alpaca(record)
        if layout == "sharegpt":
            return from_sharegpt(record)
        return record
    return convert


def detect(record: dict) -> str:
    if "conversations" in record and "messages" not in record:
        return "sharegpt"
    if "instruction" in record and "output" in record and "completion" not in record:
        return "alpaca"
    return "native"


def from_alpaca(record: dict) -> dict:
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise DataError(f'alpaca record: "{key}" must be a string')
    extra = record.get("input") or ""
    template = ALPACA_PROMPT if extra else ALPACA_PROMPT_NO_INPUT
    return {"prompt": template.format(instruction=record["instruction"], input=extra),
            "completion": record["output"]}


def from_sharegpt(record: dict) -> dict:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError('sharegpt record: "conversations" must be a non-empty list')
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f'conversations[{i}] must be {{"from": str, "value": str}}')
        role = SHAREGPT_ROLES.get(str(turn.get("from")))
        if role is None:
            raise DataError(f'conversations[{i}].from must be one of {sorted(SHAREGPT_ROLES)}, '
                            f'found {turn.get("from")!r}')
        messages.append({"role": role, "content": turn["value"]})
    return {"messages": messages}


# ---- reading ----------------------------------------------------------------------------------

def is_table(path: Path) -> bool:
    """Read as a whole table (not line by line): a datasets folder or a .json/.csv/.parquet."""
    return path.is_dir() or path.suffix.lower() in TABLE_SUFFIXES


def read_table(path: Path) -> Iterator[tuple[int, object]]:
    """(row number from 1, row) for every row of a table file or datasets folder."""
    suffix = path.suffix.lower()
    if path.is_dir():
        rows = _read_datasets_folder(path)
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ModuleNotFoundError as exc:
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install 'lorafleet[data]')"
                            ) from exc
        rows = pq.read_table(path).to_pylist()
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = _read_json(path)
    return enumerate(rows, start=1)


def _read_json(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno}); a .json file "
                        "holds one array of records (JSON Lines: name it .jsonl)") from None
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()) and data:
        # column-oriented ({"prompt": [...], "completion": [...]}), as pandas writes
        n = {len(v) for v in data.values()}
        if len(n) != 1:
            raise DataError(f"{path}: columns have different lengths {sorted(n)}")
        return [dict(zip(data, values)) for values in zip(*data.values())]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, found "
                        f"{type(data).__name__}")
    return data


def _read_datasets_folder(path: Path) -> list:
    if not any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json",
                                                     "state.json")):
        raise DataError(f"{path}: a folder is read as a Hugging Face datasets folder "
                        "(save_to_disk), but it holds no dataset_info.json / dataset_dict.json")
    try:
        import datasets
    except ModuleNotFoundError as exc:
        raise DataError(f"{path}: reading a datasets folder needs the datasets package "
                        "(pip install 'lorafleet[data]')") from exc
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: "
                            f"{sorted(loaded)}); save the split you want to train on")
        loaded = loaded["train"]
    return loaded.to_list()
