"""Training data: JSONL -> token ids + labels, loss masking, truncation, packing, batches.

Three record shapes are accepted, one JSON object per line:
    {"prompt": "...", "completion": "..."}     loss on the completion (and the EOS after it)
    {"messages": [{"role": ..., "content": ...}, ...]}   chat template; loss on assistant turns
    {"text": "..."}                            loss on every token (plain language modelling)

Labels are -100 wherever no loss is taken (the prompt, user turns, padding), the value PyTorch's
cross_entropy ignores. The tokenizer only needs `encode(text) -> list[int]`, `eos_token_id` and,
for chat records, `apply_chat_template(messages, add_generation_prompt=...)`.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafleet.errors import ConfigError, DataError
from lorafleet.train import sources

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class DataConfig:
    path: str
    max_len: int = 512
    pack: bool = False              # concatenate examples into max_len rows (no padding waste)
    val_path: str | None = None     # a separate validation JSONL file ...
    val_split: float = 0.0          # ... or a fraction of the training file held out
    skip_bad_lines: bool = False    # count and skip malformed lines instead of raising
    mask_prompt: bool = True        # labels -100 on prompt tokens (loss on completion only)
    seed: int = 0
    format: str = "auto"            # record layout (sources.RECORD_FORMATS)
    columns: str | None = None      # column mapping OURS=THEIRS,...

    def __post_init__(self):
        if self.max_len < 2:
            raise ConfigError(f"max_len must be >= 2 (found {self.max_len})")
        if not 0.0 <= self.val_split < 1.0:
            raise ConfigError(f"val_split must be in [0, 1) (found {self.val_split})")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]   # same length; IGNORE_INDEX where no loss is taken
    lengths: list[int] | None = None  # a packed row: the lengths of the examples it holds


@dataclass
class DataStats:
    lines: int = 0
    bad_lines: int = 0
    truncated: int = 0
    dropped_empty: int = 0   # no loss token left after truncation
    train_examples: int = 0
    val_examples: int = 0
    bad_line_numbers: list[int] = field(default_factory=list)


# ---- reading ----------------------------------------------------------------------------------

def read_jsonl(path: str | Path, skip_bad_lines: bool, stats: DataStats,
               convert=None) -> list[tuple[int, dict]]:
    """Return (line number, record) for every non-blank line (every row of a table file or
    datasets folder: sources.py); `convert` rewrites other layouts; validate the record's shape."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    convert = convert or sources.converter("auto", None)
    table = sources.is_table(path)
    where = "row" if table else "line"
    records = []
    for line_no, line in (sources.read_table(path) if table else _lines(path)):
        stats.lines += 1
        try:
            record = convert(line if table else json.loads(line))
            check_record(record)
        except (json.JSONDecodeError, DataError) as exc:
            reason = f"invalid JSON ({exc.msg})" if isinstance(exc, json.JSONDecodeError) \
                else str(exc)
            if not skip_bad_lines:
                raise DataError(f"{path}:{line_no}: {reason}. Expected one JSON object per "
                                'line: {"prompt","completion"}, {"messages":[...]} or '
                                '{"text"}, or an alpaca / sharegpt record (--format, --columns; '
                                'or pass --skip-bad-lines)' if not table else
                                f"{path}: {where} {line_no}: {reason}. Expected columns "
                                'prompt/completion, messages, text, alpaca (instruction/input/'
                                'output) or sharegpt (conversations); rename with --columns '
                                '(or pass --skip-bad-lines)') from None
            stats.bad_lines += 1
            stats.bad_line_numbers.append(line_no)
            continue
        records.append((line_no, record))
    return records


def _lines(path: Path):
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                yield line_no, line


def check_record(record: Any) -> None:
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, found {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError('"messages" must be a non-empty list')
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise DataError(f'messages[{i}] must be {{"role": str, "content": str}}')
            if m["role"] not in CHAT_ROLES:
                raise DataError(f'messages[{i}].role must be one of {CHAT_ROLES}, '
                                f'found {m["role"]!r}')
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError('no assistant turn to learn from')
    elif "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise DataError(f'"{key}" must be a string')
        if not record["completion"]:
            raise DataError('"completion" is empty')
    elif "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise DataError('"text" must be a non-empty string')
    else:
        raise DataError(f'no "prompt"/"completion", "messages" or "text" key '
                        f'(found keys {sorted(record)[:5]})')


# ---- tokenizing -------------------------------------------------------------------------------

def tokenize_record(record: dict, tokenizer, mask_prompt: bool = True) -> Example:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "messages" in record:
        return _tokenize_chat(record["messages"], tokenizer, mask_prompt)
    if "text" in record:
        ids = list(tokenizer.encode(record["text"])) + eos
        return Example(ids, list(ids))
    prompt = list(tokenizer.encode(record["prompt"])) if record["prompt"] else []
    completion = list(tokenizer.encode(record["completion"])) + eos
    prompt_labels = [IGNORE_INDEX] * len(prompt) if mask_prompt else list(prompt)
    return Example(prompt + completion, prompt_labels + completion)


def _render(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    if isinstance(rendered, str):
        return list(tokenizer.encode(rendered))
    if hasattr(rendered, "keys"):  # transformers may return a BatchEncoding
        rendered = rendered["input_ids"]
    return list(rendered)


def _tokenize_chat(messages: list[dict], tokenizer, mask_prompt: bool) -> Example:
    """Render the conversation prefix by prefix: the tokens an assistant turn adds to the prompt
    that precedes it (template header included) are its loss tokens."""
    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            # The "<|im_start|>assistant\n" header is prompt, not something to learn.
            header = _render(tokenizer, messages[:i], add_generation_prompt=True)
            _extend(ids, labels, header, learn=not mask_prompt)
        rendered = _render(tokenizer, messages[:i + 1], add_generation_prompt=False)
        _extend(ids, labels, rendered, learn=message["role"] == "assistant" or not mask_prompt)
    return Example(ids, labels)


def _extend(ids: list[int], labels: list[int], rendered: list[int], learn: bool) -> None:
    if rendered[:len(ids)] != ids:
        raise DataError("the chat template does not render conversations prefix by prefix, so "
                        "assistant turns cannot be located; use prompt/completion records")
    new = rendered[len(ids):]
    ids.extend(new)
    labels.extend(new if learn else [IGNORE_INDEX] * len(new))


def truncate(example: Example, max_len: int) -> Example:
    return Example(example.input_ids[:max_len], example.labels[:max_len])


def has_loss_tokens(example: Example) -> bool:
    # labels[0] never contributes (nothing predicts the first token), so it does not count.
    return any(label != IGNORE_INDEX for label in example.labels[1:])


def pack(examples: list[Example], max_len: int) -> list[Example]:
    """Whole examples, in order, into rows of at most max_len tokens; a row records its
    examples' `lengths`, from which the trainer builds a block-diagonal causal mask and positions
    that restart at 0 per example (train/packing.py), so no example attends to another: TRL's
    padding-free packing. An example's first label is dropped: nothing in its row predicts it."""
    rows: list[Example] = []
    for e in examples:
        e = truncate(e, max_len)
        labels = [IGNORE_INDEX] + e.labels[1:]
        if rows and len(rows[-1].input_ids) + len(e.input_ids) <= max_len:
            row = rows[-1]
            row.input_ids += e.input_ids
            row.labels += labels
            row.lengths.append(len(e.input_ids))
        else:
            rows.append(Example(list(e.input_ids), labels, [len(e.input_ids)]))
    return [r for r in rows if has_loss_tokens(r)]


def _tokenize_file(path, config: DataConfig, tokenizer, stats: DataStats) -> list[Example]:
    examples = []
    convert = sources.converter(config.format, config.columns)
    for line_no, record in read_jsonl(path, config.skip_bad_lines, stats, convert):
        example = tokenize_record(record, tokenizer, config.mask_prompt)
        if len(example.input_ids) > config.max_len:
            stats.truncated += 1
            example = truncate(example, config.max_len)
        if not has_loss_tokens(example):
            stats.dropped_empty += 1
            logger.debug("%s:%d: nothing to learn after truncation to %d tokens; dropped",
                         path, line_no, config.max_len)
            continue
        examples.append(example)
    return examples


def load_dataset(config: DataConfig, tokenizer) -> tuple[list[Example], list[Example], DataStats]:
    """Read, tokenize, truncate (or pack) and split. Returns (train, val, stats)."""
    stats = DataStats()
    examples = _tokenize_file(config.path, config, tokenizer, stats)
    if config.val_path:
        val = _tokenize_file(config.val_path, config, tokenizer, DataStats())
    elif config.val_split > 0:
        order = list(range(len(examples)))
        random.Random(config.seed).shuffle(order)
        n_val = max(1, round(len(examples) * config.val_split)) if len(examples) > 1 else 0
        held = set(order[:n_val])
        val = [e for i, e in enumerate(examples) if i in held]
        examples = [e for i, e in enumerate(examples) if i not in held]
    else:
        val = []
    if config.pack:
        examples, val = pack(examples, config.max_len), pack(val, config.max_len)
    if not examples:
        raise DataError(f"{config.path}: no training examples ({stats.lines} lines, "
                        f"{stats.bad_lines} malformed, {stats.dropped_empty} with nothing to "
                        f"learn after truncation to max_len={config.max_len})")
    stats.train_examples, stats.val_examples = len(examples), len(val)
    if stats.truncated or stats.dropped_empty or stats.bad_lines:
        logger.warning("%s: %d examples truncated to %d tokens, %d dropped (empty completion "
                       "after truncation), %d malformed lines skipped", config.path,
                       stats.truncated, config.max_len, stats.dropped_empty, stats.bad_lines)
    return examples, val, stats


# ---- batching ---------------------------------------------------------------------------------

class Sampler:
    """Endless, deterministic example order: epoch e is a shuffle seeded by (seed, e).

    The position (epoch, cursor) is all the state there is, so a checkpoint saves two integers
    and a resumed run draws exactly the examples the uninterrupted run would have drawn.
    """

    def __init__(self, n_examples: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n_examples, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[int]:
        indices = []
        while len(indices) < count:
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            indices.append(self._order[self.cursor])
            self.cursor += 1
        return indices

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example. Returns input_ids, labels: [B, T] (int64).
    Right padding needs no attention mask under causal attention: real tokens never see pads.
    (Packed rows also need their segments: packing.packed_batch.)"""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, :len(e.labels)] = torch.tensor(e.labels)
    return input_ids, labels
