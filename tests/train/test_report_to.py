"""`lorafleet train --report-to tensorboard|wandb`: what the tracker holds, read back with the
tracker's own reader, equals log.jsonl step by step (loss, learning rate, eval loss). wandb runs
offline (no network here); its run file is read with wandb's own protobuf `Record` message."""
import json
import math
import struct
from pathlib import Path

import pytest

from lorafleet.cli import main
from lorafleet.train.report import read_log


def _train(tmp_path, llama_dir, toy_data, report_to: str) -> Path:
    out = tmp_path / report_to
    assert main(["train", "--model", str(llama_dir), "--data", str(toy_data), "--out", str(out),
                 "--steps", "3", "--lr", "1e-2", "--val-file", str(toy_data),
                 "--eval-every", "2", "--report-to", report_to, "--no-progress"]) == 0
    return out


def _logged(out: Path) -> dict[str, dict[int, float]]:
    """log.jsonl as {scalar name: {step: value}}."""
    series: dict[str, dict[int, float]] = {}
    for record in read_log(out):
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, {})[record["step"]] = value
    return series


def _assert_same(tracked: dict[str, dict[int, float]], logged: dict[str, dict[int, float]]):
    assert {"loss", "lr", "eval_loss"} <= set(logged)
    assert len(logged["loss"]) == 3 and len(logged["eval_loss"]) >= 1
    for key, steps in logged.items():
        assert set(tracked.get(key, {})) == set(steps), key
        for step, value in steps.items():
            # TensorBoard stores float32 scalars
            assert math.isclose(tracked[key][step], value, rel_tol=1e-6, abs_tol=1e-9), \
                (key, step, tracked[key][step], value)


def test_report_to_tensorboard_holds_the_logged_values(tmp_path, llama_dir, toy_data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _train(tmp_path, llama_dir, toy_data, "tensorboard")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tracked = {tag: {e.step: e.value for e in events.Scalars(tag)}
               for tag in events.Tags()["scalars"]}
    _assert_same(tracked, _logged(out))


def _wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's .wandb file: a 7-byte header (":W&B", magic,
    version), then LevelDB-log framing (32 KiB blocks; each chunk a 7-byte header of checksum,
    length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    records, chunk, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:          # a block's tail too short for a header: padding
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def test_report_to_wandb_offline_holds_the_logged_values(tmp_path, llama_dir, toy_data,
                                                         monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)      # the default must be offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    out = _train(tmp_path, llama_dir, toy_data, "wandb")
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    tracked: dict[str, dict[int, float]] = {}
    for record in _wandb_records(run_file):
        if record.WhichOneof("record_type") != "history":
            continue
        items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                 for item in record.history.item}
        for key, value in items.items():
            if not key.startswith("_"):
                tracked.setdefault(key, {})[items["_step"]] = value
    _assert_same(tracked, _logged(out))


@pytest.mark.parametrize("report_to, module", [("tensorboard", "torch.utils.tensorboard"),
                                                ("wandb", "wandb")])
def test_report_to_without_the_package_names_the_extra(tmp_path, llama_dir, toy_data,
                                                         monkeypatch, report_to, module):
    import sys

    from lorafleet.errors import ConfigError
    from lorafleet.train import TrainConfig, train

    monkeypatch.setitem(sys.modules, module, None)       # `import` of it now raises ImportError
    with pytest.raises(ConfigError, match=rf"--report-to {report_to} needs .*lorafleet\[track\]"):
        train(TrainConfig.from_flat(model=str(llama_dir), data=str(toy_data),
                                    out=str(tmp_path / "run"), steps=1, report_to=report_to))
