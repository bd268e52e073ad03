"""Progress callbacks (STYLE.md rule 8): the loaders and the checkpoint merge call
progress(done, total) from (0, total) up to (total, total), one step per checkpoint tensor; the
CLI's bar draws only on a terminal and never with --no-progress."""
import io

import pytest
import torch
from safetensors import safe_open

from lorafleet.cli.progress import ProgressBar
from lorafleet.lora.merge import merge_checkpoint
from lorafleet.models import load_model
from lorafleet.quant import load_quantized_model
from tests.lora.lora_helpers import peft_random


def _tensor_count(folder) -> int:
    """Tensors stored in the folder's safetensors files, read from their headers."""
    count = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            count += len(list(f.keys()))
    return count


def _check_calls(calls, total):
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [done for done, _ in calls] == list(range(total + 1))
    assert {t for _, t in calls} == {total}


def test_load_model_progress(llama_dir):
    calls = []
    model = load_model(llama_dir, progress=lambda done, total: calls.append((done, total)))
    _check_calls(calls, _tensor_count(llama_dir))
    silent = load_model(llama_dir)  # the callback changes nothing that is loaded
    for key, tensor in silent.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], tensor, rtol=0, atol=0)


def test_load_quantized_model_progress(llama_dir):
    calls = []
    load_quantized_model(llama_dir, dtype=torch.float32,
                         progress=lambda done, total: calls.append((done, total)))
    _check_calls(calls, _tensor_count(llama_dir))


def test_merge_checkpoint_progress(llama_dir, tmp_path):
    peft_random(llama_dir, target_modules=["q_proj", "v_proj"]).save_pretrained(tmp_path / "a")
    calls = []
    merge_checkpoint(llama_dir, tmp_path / "a", tmp_path / "merged",
                     progress=lambda done, total: calls.append((done, total)))
    _check_calls(calls, _tensor_count(llama_dir))


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bar_draws_on_a_terminal_only():
    drawn = _Terminal()
    bar = ProgressBar("loading", stream=drawn)
    for done in range(4):
        bar(done, 3)
    assert "loading" in drawn.getvalue() and "/3" in drawn.getvalue()
    assert bar.bar is None  # closed at done == total

    for stream, enabled in ((io.StringIO(), True), (_Terminal(), False)):
        bar = ProgressBar("loading", stream=stream, enabled=enabled)
        for done in range(4):
            bar(done, 3)
        assert stream.getvalue() == ""


@pytest.mark.parametrize("flags", [[], ["--no-progress"]])
def test_cli_generate_keeps_stderr_clean_off_a_terminal(llama_dir, capsys, flags):
    from lorafleet.cli import main

    assert main(["generate", "--model", str(llama_dir), "--prompt", "the", "--max-tokens", "2",
                 "--json", *flags]) == 0
    assert capsys.readouterr().err == ""
