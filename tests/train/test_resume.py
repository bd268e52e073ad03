"""Checkpoint atomicity, Ctrl-C resume, gradient clipping, --epochs, and `bench train`."""
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import lorafleet.train.checkpoint as checkpoint_mod
from lorafleet.cli import main
from lorafleet.train import TrainConfig, train
from lorafleet.train.checkpoint import latest_checkpoint, load_checkpoint
from lorafleet.train.data import Sampler

from .conftest import get_tokenizer, toy_records, write_jsonl


def config(llama_dir, data, out, **kw):
    base = dict(model=str(llama_dir), data=str(data), out=str(out), method="lora", steps=4,
                lr=1e-2, batch_size=2, targets="q,v", dropout=0.1, warmup=1)
    base.update(kw)
    return TrainConfig.from_flat(**base)


def adapter_tensors(result):
    return load_file(str(result.artifact / "adapter_model.safetensors"))


def assert_same_adapter(a, b):
    a, b = adapter_tensors(a), adapter_tensors(b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, llama_dir):
    """The reference: 4 steps in one go (dropout > 0 so restored RNG states matter)."""
    tmp = tmp_path_factory.mktemp("full")
    data = write_jsonl(tmp / "toy.jsonl", toy_records())
    return data, train(config(llama_dir, data, tmp / "run"), tokenizer=get_tokenizer(llama_dir))


class Crash(Exception):
    pass


@pytest.mark.parametrize("where", ["mid-folder", "before-pointer"])
def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, llama_dir,
                                                      uninterrupted, where):
    """The save at step 4 dies: partway through writing its files (mid-folder), or after the
    folder is complete and renamed but before `latest` moves (before-pointer). `latest` must
    still name step 2, load, and resume to the uninterrupted run's adapter."""
    data, full = uninterrupted
    real_torch_save, real_replace = torch.save, os.replace
    saves = {"n": 0}

    def crashing_torch_save(obj, f, *a, **kw):
        saves["n"] += 1
        if saves["n"] == 2:  # the second checkpoint: trainable/rng written, optimizer not
            open(f, "wb").write(b"\x00partial")
            raise Crash("disk full")
        return real_torch_save(obj, f, *a, **kw)

    def crashing_replace(src, dst, *a, **kw):
        if str(dst).endswith("latest"):
            saves["n"] += 1
            if saves["n"] == 2:
                raise Crash("power cut")
        return real_replace(src, dst, *a, **kw)

    if where == "mid-folder":
        monkeypatch.setattr(torch, "save", crashing_torch_save)
    else:
        monkeypatch.setattr(checkpoint_mod.os, "replace", crashing_replace)
    out = tmp_path / "run"
    tok = get_tokenizer(llama_dir)
    with pytest.raises(Crash):
        train(config(llama_dir, data, out, save_every=2), tokenizer=tok)
    monkeypatch.undo()

    left = {p.name for p in (out / "checkpoints").iterdir()}
    if where == "mid-folder":  # the partial folder is a temp folder nobody points at
        assert any(n.startswith(".tmp-step-00000004") for n in left), left
        assert "step-00000004" not in left
    else:  # the step-4 folder is complete but `latest` was never moved to it
        assert "step-00000004" in left
    assert (out / "checkpoints" / "latest").read_text() == "step-00000002"
    ckpt = load_checkpoint(latest_checkpoint(out))
    assert ckpt.step == 2 and all(torch.isfinite(t).all() for t in ckpt.trainable.values())

    # a resumed run is another process: the crashed one's temp folder must not outlive it
    monkeypatch.setattr(checkpoint_mod.os, "getpid", lambda: 1)
    resumed = train(config(llama_dir, data, out, save_every=2, resume=True), tokenizer=tok)
    monkeypatch.undo()
    assert resumed.steps == 4
    assert_same_adapter(full, resumed)
    assert load_checkpoint(latest_checkpoint(out)).step == 4
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir()
                   if p.name != "latest")


def test_resume_after_sigint_is_bit_exact(tmp_path, llama_dir, uninterrupted):
    """Ctrl-C goes through the same handler as SIGTERM (see test_trainer's SIGTERM test)."""
    data, full = uninterrupted
    tok = get_tokenizer(llama_dir)

    def interrupt(event):
        if event["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # not KeyboardInterrupt: the handler catches it

    handler_before = signal.getsignal(signal.SIGINT)
    cut = train(config(llama_dir, data, tmp_path / "b"), tokenizer=tok, callback=interrupt)
    assert signal.getsignal(signal.SIGINT) is handler_before  # the trainer restores it
    assert cut.interrupted and cut.steps == 2 and cut.artifact is None
    assert load_checkpoint(latest_checkpoint(tmp_path / "b")).step == 2
    resumed = train(config(llama_dir, data, tmp_path / "b", resume=True), tokenizer=tok)
    assert resumed.steps == 4
    assert_same_adapter(full, resumed)
    losses = [e["loss"] for e in full.history if e["type"] == "step"]
    assert losses[2:] == [e["loss"] for e in resumed.history if e["type"] == "step"]


def grads_at_first_step(monkeypatch, llama_dir, data, out, max_grad_norm):
    """The gradients AdamW sees at the first optimizer step of a real `train` run."""
    seen = {}
    real_step = torch.optim.AdamW.step

    def recording_step(self, *a, **kw):
        if not seen:
            seen.update({i: p.grad.clone() for i, p in enumerate(
                p for g in self.param_groups for p in g["params"]) if p.grad is not None})
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    result = train(config(llama_dir, data, out, steps=1, dropout=0.0, targets="all-linear",
                          max_grad_norm=max_grad_norm), tokenizer=get_tokenizer(llama_dir))
    monkeypatch.undo()
    return seen, result.history[0]["grad_norm"]


def test_gradient_clipping_matches_a_manual_clip(tmp_path, monkeypatch, llama_dir,
                                                 uninterrupted):
    data, _ = uninterrupted
    raw, _ = grads_at_first_step(monkeypatch, llama_dir, data, tmp_path / "raw", 0.0)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                 for g in raw.values()])).item()
    assert norm > 0
    limit = norm / 4
    clipped, reported = grads_at_first_step(monkeypatch, llama_dir, data, tmp_path / "c", limit)
    assert reported == pytest.approx(norm, rel=1e-5)  # the log reports the pre-clip norm
    assert raw.keys() == clipped.keys()
    for i in raw:  # torch's clip_grad_norm_: g * max_norm / (norm + 1e-6)
        torch.testing.assert_close(clipped[i], raw[i] * (limit / (norm + 1e-6)),
                                   rtol=1e-5, atol=1e-9)
    # a limit above the norm leaves the gradients as they are
    loose, _ = grads_at_first_step(monkeypatch, llama_dir, data, tmp_path / "l", 2 * norm)
    assert all(torch.equal(loose[i], raw[i]) for i in raw)


@pytest.mark.parametrize("epochs, batch_size, grad_accum, steps", [
    (2, 2, 1, 8),      # 8 train examples (2 of 10 held out) x 2 epochs / global batch 2
    (1.5, 2, 2, 3),    # ceil(1.5 * 8 / 4)
])
def test_epochs_run_the_steps_the_dataset_size_implies(tmp_path, monkeypatch, llama_dir,
                                                       epochs, batch_size, grad_accum, steps):
    data = write_jsonl(tmp_path / "d.jsonl", toy_records(10))
    drawn = []
    real_take = Sampler.take

    def recording_take(self, count):
        indices = real_take(self, count)
        drawn.extend(indices)
        return indices

    monkeypatch.setattr(Sampler, "take", recording_take)
    result = train(config(llama_dir, data, tmp_path / "run", steps=None, epochs=epochs,
                          val_split=0.2, batch_size=batch_size, grad_accum=grad_accum,
                          dropout=0.0), tokenizer=get_tokenizer(llama_dir))
    assert result.steps == steps
    step_events = [e for e in result.history if e["type"] == "step"]
    assert [e["total_steps"] for e in step_events] == [steps] * steps
    assert len(drawn) == steps * batch_size * grad_accum
    if epochs == 2:  # whole epochs: every training example exactly twice
        assert sorted(drawn) == sorted(list(range(8)) * 2)


@pytest.mark.slow
def test_bench_train_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "train", "--hidden", "64", "--layers", "1", "--intermediate", "128",
                 "--heads", "4", "--vocab", "256", "--seq-len", "16", "--steps", "1",
                 "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {"lora", "lora+ckpt", "lora-bf16", "lora-bf16+ckpt", "qlora",
                            "qlora+ckpt", "full", "full+ckpt"}
    for kind in ("lora", "lora-bf16", "qlora"):   # r=8 on q and v, whatever the base
        assert results[kind]["trainable_params"] == 1 * 2 * 8 * (64 + 64), kind
    assert 0 < report["ratios"]["qlora_over_lora_fp32_memory"]
    assert results["full"]["trainable_params"] == results["full"]["total_params"]
    assert all(r["step_time_s"] > 0 and r["peak_rss_mib"] > 0 for r in results.values())
    assert report["versus_peft"]["ours_step_s"] > 0 and report["versus_peft"]["peft_step_s"] > 0
    assert "LoRA / full memory" in capsys.readouterr().out
