"""Data as users have it: Alpaca, ShareGPT, Parquet, CSV, JSON arrays and datasets folders read
to the same examples as the equivalent JSONL records, and each trains."""
import csv
import json

import pytest

from lorafleet.errors import DataError
from lorafleet.train import DataConfig, TrainConfig, load_dataset, train
from lorafleet.train.sources import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

from .conftest import toy_records, write_jsonl

ALPACA = [{"instruction": "Reverse the words.", "input": "one two three",
           "output": "three two one"},
          {"instruction": "Say hi.", "input": "", "output": "hi"}]
SHAREGPT = [{"conversations": [{"from": "system", "value": "be brief"},
                               {"from": "human", "value": "hi"},
                               {"from": "gpt", "value": "hello"},
                               {"from": "human", "value": "bye"},
                               {"from": "gpt", "value": "ciao"}]}]


def ids(examples):
    return [(e.input_ids, e.labels) for e in examples]


def read(path, tokenizer, **kw):
    return load_dataset(DataConfig(str(path), max_len=256, **kw), tokenizer)[0]


def test_alpaca_is_prompt_completion_with_the_alpaca_template(tmp_path, tokenizer):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA))
    native = write_jsonl(tmp_path / "native.jsonl", [
        {"prompt": ALPACA_PROMPT.format(instruction=ALPACA[0]["instruction"],
                                        input=ALPACA[0]["input"]), "completion": "three two one"},
        {"prompt": ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi."), "completion": "hi"}])
    assert ids(read(path, tokenizer)) == ids(read(native, tokenizer))
    assert ids(read(path, tokenizer, format="alpaca")) == ids(read(native, tokenizer))


def test_sharegpt_is_messages(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sharegpt.jsonl", SHAREGPT)
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    native = write_jsonl(tmp_path / "native.jsonl", [{"messages": [
        {"role": roles[t["from"]], "content": t["value"]} for t in SHAREGPT[0]["conversations"]]}])
    assert ids(read(path, tokenizer)) == ids(read(native, tokenizer))
    bad = write_jsonl(tmp_path / "bad.jsonl",
                      [{"conversations": [{"from": "robot", "value": "x"}]}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: conversations\[0\].from"):
        read(bad, tokenizer)


def test_parquet_csv_json_and_datasets_folder_read_like_jsonl(tmp_path, tokenizer):
    pa = pytest.importorskip("pyarrow", reason="Parquet support is optional (pyarrow)")
    import pyarrow.parquet as pq
    datasets = pytest.importorskip("datasets", reason="datasets folders are optional (datasets)")
    records = toy_records()
    expected = ids(read(write_jsonl(tmp_path / "toy.jsonl", records), tokenizer))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "toy.parquet")
    (tmp_path / "toy.json").write_text(json.dumps(records))
    columns = {"prompt": [r["prompt"] for r in records],
               "completion": [r["completion"] for r in records]}
    (tmp_path / "columns.json").write_text(json.dumps(columns))
    with (tmp_path / "toy.csv").open("w", newline="") as f:       # other column names
        writer = csv.DictWriter(f, fieldnames=["question", "answer"])
        writer.writeheader()
        writer.writerows({"question": r["prompt"], "answer": r["completion"]} for r in records)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "folder"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(
        str(tmp_path / "dict"))
    for name in ("toy.parquet", "toy.json", "columns.json", "folder", "dict"):
        assert ids(read(tmp_path / name, tokenizer)) == expected, name
    assert ids(read(tmp_path / "toy.csv", tokenizer,
                    columns="prompt=question,completion=answer")) == expected
    with pytest.raises(DataError, match=r"toy.csv: row 1: .*--columns"):
        read(tmp_path / "toy.csv", tokenizer)


@pytest.mark.parametrize("layout", ["alpaca", "sharegpt", "parquet", "datasets"])
def test_each_layout_trains(tmp_path, llama_dir, layout):
    if layout == "alpaca":
        data = tmp_path / "alpaca.json"
        data.write_text(json.dumps(ALPACA * 2))
    elif layout == "sharegpt":
        data = write_jsonl(tmp_path / "sharegpt.jsonl", SHAREGPT * 4)
    elif layout == "parquet":
        pa = pytest.importorskip("pyarrow", reason="Parquet support is optional (pyarrow)")
        import pyarrow.parquet as pq
        data = tmp_path / "toy.parquet"
        pq.write_table(pa.Table.from_pylist(toy_records()), data)
    else:
        datasets = pytest.importorskip("datasets", reason="datasets folders are optional")
        data = tmp_path / "folder"
        datasets.Dataset.from_list(toy_records()).save_to_disk(str(data))
    result = train(TrainConfig.from_flat(model=str(llama_dir), data=str(data),
                                         out=str(tmp_path / "out"), steps=4, lr=1e-2,
                                         batch_size=2, pack=layout == "parquet"))
    losses = [e["loss"] for e in result.history if e["type"] == "step"]
    assert len(losses) == 4 and all(map(lambda x: x == x, losses))
    assert losses[-1] < losses[0]
    assert (result.artifact / "adapter_model.safetensors").is_file()
