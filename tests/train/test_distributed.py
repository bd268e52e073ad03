"""Two processes on gloo (CPU), started the way torchrun starts them: DDP and FSDP2 runs equal a
one-process run with the same global batch (within float tolerance: sums in another order), a
run stopped by one rank and resumed is bit-identical to an uninterrupted one, and the wrong
setup is a clear error before any work."""
import json
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lorafleet.errors import ConfigError, TrainingError
from lorafleet.train import TrainConfig, train

from .conftest import get_tokenizer, toy_records, write_jsonl
from .dist_worker import KILLED, run_rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings(llama_dir, data, out, **kw):
    base = dict(model=str(llama_dir), data=str(data), out=str(out), method="lora", steps=4,
                lr=1e-2, batch_size=1, grad_accum=2, targets="all-linear", device="cpu")
    return {**base, **kw}


def two_processes(tmp_path, values: dict, stop_at: int | None = None,
                  kill_at: int | None = None) -> dict:
    report = tmp_path / f"report-{free_port()}.json"
    try:
        mp.spawn(run_rank, args=(2, free_port(), values, stop_at, str(report), kill_at),
                 nprocs=2)
    except mp.ProcessExitedException as exc:
        assert kill_at and exc.exit_code == KILLED, exc
        return {"killed": True}
    return json.loads(report.read_text())


def one_process(llama_dir, values: dict, **kw):
    """The same global batch in one process: batch_size x 2 (the other rank's share)."""
    values = {**values, "batch_size": values["batch_size"] * 2, **kw}
    return train(TrainConfig.from_flat(**values), tokenizer=get_tokenizer(llama_dir))


def trained_tensors(out):
    folder = out / "adapter"
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").is_file() \
        else "trainable.safetensors"
    return load_file(str(folder / name))


def assert_close_tensors(a, b, exact=False):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            # Adam turns a tiny gradient difference on a near-zero gradient into at most an
            # lr-sized step; 1% of lr (1e-2) is far below what a wrong batch split would give.
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", toy_records(8))


@pytest.mark.slow
@pytest.mark.parametrize("parallel, cut", [("ddp", "stop"), ("ddp", "kill"), ("fsdp", "kill")])
def test_two_processes_equal_one_and_resume_exactly(tmp_path, llama_dir, data, parallel, cut):
    # grad_accum=2: DDP's no_sync / FSDP's set_requires_gradient_sync on the first micro-batch
    values = settings(llama_dir, data, tmp_path / "two", parallel=parallel)
    report = two_processes(tmp_path, values)
    assert report == {**report, "steps": 4, "interrupted": False}
    single = one_process(llama_dir, values, out=str(tmp_path / "one"), parallel="none")
    assert_close_tensors(trained_tensors(tmp_path / "one"), trained_tensors(tmp_path / "two"))
    single_losses = [e["loss"] for e in single.history if e["type"] == "step"]
    assert report["losses"] == pytest.approx(single_losses, rel=1e-5)

    # Dropout: each rank's RNG stream (not rank 0's) must come back on resume.
    values = settings(llama_dir, data, tmp_path / "ref", parallel=parallel, dropout=0.1)
    reference = two_processes(tmp_path, values)
    cut_values = {**values, "out": str(tmp_path / "cut"), "save_every": 2}
    if cut == "stop":  # rank 0 alone asks to stop after step 2 (checkpoint on the way out)
        cut = two_processes(tmp_path, cut_values, stop_at=2)
        assert cut["interrupted"] and cut["steps"] == 2
    else:  # every process killed after step 3: resume from the step-2 checkpoint
        assert two_processes(tmp_path, cut_values, kill_at=3) == {"killed": True}
    resumed = two_processes(tmp_path, {**cut_values, "resume": True})
    assert resumed["steps"] == 4 and resumed["losses"] == reference["losses"][2:]
    assert_close_tensors(trained_tensors(tmp_path / "ref"), trained_tensors(tmp_path / "cut"),
                         exact=True)
    # A checkpoint of 2 processes does not resume in 1 (its data split and RNG are theirs).
    with pytest.raises(TrainingError, match="written by 2 process"):
        train(TrainConfig.from_flat(**{**cut_values, "resume": True, "parallel": "auto"}),
              tokenizer=get_tokenizer(llama_dir))


@pytest.mark.slow
def test_fsdp_full_fine_tuning_equals_one_process(tmp_path, llama_dir, data):
    values = settings(llama_dir, data, tmp_path / "two", method="full", parallel="fsdp",
                      steps=2, lr=1e-3)
    two_processes(tmp_path, values)
    one_process(llama_dir, values, out=str(tmp_path / "one"), parallel="none")
    a, b = trained_tensors(tmp_path / "one"), trained_tensors(tmp_path / "two")
    assert len(a) > 10 and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)


def test_parallel_flags_need_torchrun(tmp_path, llama_dir, data):
    for mode in ("ddp", "fsdp"):
        with pytest.raises(ConfigError, match=f"--parallel {mode} needs several processes"):
            train(TrainConfig.from_flat(**settings(llama_dir, data, tmp_path / mode,
                                                   parallel=mode)))
    assert not (tmp_path / "ddp").exists()  # refused before any work


@pytest.mark.slow
def test_the_documented_two_machine_torchrun_command(tmp_path, llama_dir, data):
    """docs/train.md's several-machines command, as two "machines" (two torchrun launchers with
    --nnodes 2 and their own --node_rank) on one host."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    port = free_port()
    flags = ["--model", str(llama_dir), "--data", str(data), "--steps", "2", "--lr", "1e-2",
             "--targets", "all-linear", "--device", "cpu", "--batch-size", "2", "--no-progress"]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launchers = [subprocess.Popen(
        [torchrun, "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
         "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "lorafleet.cli",
         "train", "--out", str(tmp_path / "two"), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for node in (0, 1)]
    for launcher in launchers:
        _, err = launcher.communicate(timeout=300)
        assert launcher.returncode == 0, err[-3000:]
    one_process(llama_dir, settings(llama_dir, data, tmp_path / "one", steps=2, grad_accum=1,
                                    batch_size=2, parallel="none"))
    assert_close_tensors(trained_tensors(tmp_path / "one"), trained_tensors(tmp_path / "two"))
