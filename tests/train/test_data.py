import json

import pytest
import torch

from lorafleet.errors import ConfigError, DataError
from lorafleet.train.data import (IGNORE_INDEX, DataConfig, Sampler, collate, load_dataset,
                                  tokenize_record)

from .conftest import toy_records, write_jsonl


def test_prompt_completion_masks_the_prompt(tokenizer):
    ex = tokenize_record({"prompt": "the quick", "completion": " brown fox"}, tokenizer)
    prompt = tokenizer.encode("the quick")
    completion = tokenizer.encode(" brown fox") + [tokenizer.eos_token_id]
    assert ex.input_ids == prompt + completion
    assert ex.labels == [IGNORE_INDEX] * len(prompt) + completion
    unmasked = tokenize_record({"prompt": "the quick", "completion": " brown fox"}, tokenizer,
                               mask_prompt=False)
    assert unmasked.labels == unmasked.input_ids


def test_text_trains_on_every_token(tokenizer):
    ex = tokenize_record({"text": "to be or not"}, tokenizer)
    assert ex.labels == ex.input_ids == tokenizer.encode("to be or not") + [tokenizer.eos_token_id]


def test_chat_loss_on_assistant_turns_only(tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "the fox"}, {"role": "user", "content": "and"},
                {"role": "assistant", "content": "the dog"}]
    ex = tokenize_record({"messages": messages}, tokenizer)
    # The ids are exactly the full rendering (oracle: the tokenizer's own chat template).
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert ex.input_ids == (tokenizer.encode(full) if isinstance(full, str) else list(full))
    learned = tokenizer.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE_INDEX])
    assert "the fox" in learned and "the dog" in learned
    assert "hi" not in learned and "be brief" not in learned and "user" not in learned
    assert "assistant" not in learned  # the generation header is prompt


def test_truncation_counted_and_empty_completion_dropped(tmp_path, tokenizer):
    long_prompt = " ".join(["the quick brown fox"] * 20)
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "the", "completion": " " + long_prompt},     # truncated, keeps some loss
        {"prompt": long_prompt, "completion": " dog"},          # completion cut away: dropped
        {"prompt": "a", "completion": " b"}])
    train, val, stats = load_dataset(DataConfig(str(path), max_len=16), tokenizer)
    assert stats.truncated == 2 and stats.dropped_empty == 1
    assert len(train) == 2 and all(len(e.input_ids) <= 16 for e in train)


def test_malformed_line_names_file_and_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", [toy_records()[0], "{not json", toy_records()[1]])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON.*Expected one JSON object"):
        load_dataset(DataConfig(str(path)), tokenizer)
    train, _, stats = load_dataset(DataConfig(str(path), skip_bad_lines=True), tokenizer)
    assert stats.bad_lines == 1 and stats.bad_line_numbers == [2] and len(train) == 2


@pytest.mark.parametrize("record, message", [
    ({"prompt": "a"}, '"completion" must be a string'),
    ({"prompt": "a", "completion": ""}, '"completion" is empty'),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "role must be one of"),
    ({"input": "x"}, 'no "prompt"/"completion", "messages" or "text" key'),
    ([1, 2], "expected a JSON object"),
])
def test_bad_record_shapes(tmp_path, tokenizer, record, message):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(record)])
    with pytest.raises(DataError, match=r"d\.jsonl:1: .*" + message.replace("(", r"\(")
                       .replace("[", r"\[")):
        load_dataset(DataConfig(str(path)), tokenizer)


def test_empty_dataset_is_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no training examples"):
        load_dataset(DataConfig(str(write_jsonl(tmp_path / "e.jsonl", []))), tokenizer)
    with pytest.raises(DataError, match="not found"):
        load_dataset(DataConfig(str(tmp_path / "missing.jsonl")), tokenizer)
    with pytest.raises(ConfigError, match="val_split"):
        DataConfig("x", val_split=1.5)


def test_packing_and_validation_split(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", toy_records(10))
    train, val, stats = load_dataset(DataConfig(str(path), val_split=0.2, seed=3), tokenizer)
    assert (len(train), len(val)) == (8, 2)
    again, val2, _ = load_dataset(DataConfig(str(path), val_split=0.2, seed=3), tokenizer)
    assert [e.input_ids for e in val] == [e.input_ids for e in val2]
    packed, _, _ = load_dataset(DataConfig(str(path), max_len=32, pack=True), tokenizer)
    total = sum(len(e.input_ids) for e in load_dataset(DataConfig(str(path)), tokenizer)[0])
    assert all(len(e.input_ids) <= 32 for e in packed)
    assert sum(len(e.input_ids) for e in packed) == total
    val_file = write_jsonl(tmp_path / "v.jsonl", toy_records(3))
    _, val3, _ = load_dataset(DataConfig(str(path), val_path=str(val_file)), tokenizer)
    assert len(val3) == 3


def test_sampler_is_deterministic_and_resumable():
    a = Sampler(7, seed=1)
    first = a.take(10)
    state = a.state_dict()
    rest = a.take(9)
    b = Sampler(7, seed=1)
    assert b.take(10) == first
    c = Sampler(7, seed=1)
    c.load_state_dict(state)
    assert c.take(9) == rest
    assert sorted(first[:7]) == list(range(7))     # each epoch is a permutation
    assert Sampler(7, seed=2).take(7) != first[:7]


def test_collate_pads_right_with_ignored_labels(tokenizer):
    a = tokenize_record({"prompt": "a", "completion": " b"}, tokenizer)
    b = tokenize_record({"text": "the quick brown fox"}, tokenizer)
    ids, labels = collate([a, b], pad_id=1)
    assert ids.shape == labels.shape == (2, max(len(a.input_ids), len(b.input_ids)))
    assert (labels[0, len(a.labels):] == IGNORE_INDEX).all()
    assert ids.dtype == torch.long
