"""A training run's folder and its intermediate checkpoints' folders (`OUT/`,
`OUT/checkpoints/step-N/`) name their adapter/ wherever an adapter is expected: `serve
--adapter`, `lorafleet eval`; the library's reader says where the PEFT folder is."""
import json
from pathlib import Path

import pytest

from lorafleet.cli import build_parser, main
from lorafleet.errors import AdapterError
from lorafleet.lora.peft_format import adapter_folder, read_config
from lorafleet.train import TrainConfig, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, llama_dir):
    from .conftest import toy_records, write_jsonl
    tmp = tmp_path_factory.mktemp("ckpt")
    data = write_jsonl(tmp / "toy.jsonl", toy_records())
    train(TrainConfig.from_flat(model=str(llama_dir), data=str(data), out=str(tmp / "run"),
                                steps=4, lr=1e-2, save_every=2, keep_checkpoints=3))
    return tmp / "run", data


def test_reader_points_at_the_adapter_inside(run_dir):
    run, _ = run_dir
    step2 = run / "checkpoints" / "step-00000002"
    assert adapter_folder(step2) == step2 / "adapter"
    assert adapter_folder(run) == run / "adapter"
    assert adapter_folder(run / "adapter") == run / "adapter"         # a PEFT folder: itself
    with pytest.raises(AdapterError, match=r"its PEFT folder is .*step-00000002/adapter"):
        read_config(step2)


def test_serve_accepts_checkpoint_and_run_folders(run_dir, llama_dir):
    from lorafleet.cli.serve import build

    run, _ = run_dir
    step2 = run / "checkpoints" / "step-00000002"
    args = build_parser().parse_args(
        ["serve", "--model", str(llama_dir), "--num-pages", "256", "--dtype", "float32",
         "--adapter", f"ckpt={step2}", "--adapter", f"ckpt-inner={step2 / 'adapter'}",
         "--lora-modules", f"final={run}", "--no-progress"])
    engine = build(args)[0]        # registered whole: every tensor read and checked
    paths = {name: Path(engine.cache.specs[name].path) for name in ("ckpt", "ckpt-inner",
                                                                     "final")}
    assert paths["ckpt"] == paths["ckpt-inner"] == step2 / "adapter"
    assert paths["final"] == run / "adapter"


def test_eval_accepts_checkpoint_and_run_folders(run_dir, llama_dir, capsys):
    run, data = run_dir
    step2 = run / "checkpoints" / "step-00000002"
    assert main(["eval", "--model", str(llama_dir), "--data", str(data), "--json",
                 str(step2), str(step2 / "adapter"), str(run), str(run / "adapter")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["loss"] == rows[1]["loss"] and rows[2]["loss"] == rows[3]["loss"]
    assert rows[0]["loss"] != rows[2]["loss"]                 # step 2 differs from the end
