import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.errors import ConfigError, TrainingError
from lorafleet.models import load_model
from lorafleet.train import TrainConfig, train
from lorafleet.train.checkpoint import latest_checkpoint, load_checkpoint
from lorafleet.train.trainer import learning_rate

from .conftest import get_tokenizer, toy_records, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def config(llama_dir, data, out, **kw):
    base = dict(model=str(llama_dir), data=str(data), out=str(out), method="lora", steps=6,
                lr=1e-2, batch_size=2, targets="q,v")
    base.update(kw)
    return TrainConfig.from_flat(**base)


def adapter_tensors(result):
    return load_file(str(result.artifact / "adapter_model.safetensors"))


def test_resume_after_sigterm_is_bit_exact(tmp_path, llama_dir, toy_data):
    tok = get_tokenizer(llama_dir)
    # dropout > 0 so the restored RNG state matters; 6 steps x 2 > 8 examples crosses an epoch.
    kw = dict(dropout=0.1, warmup=2, grad_accum=2)
    full = train(config(llama_dir, toy_data, tmp_path / "a", **kw), tokenizer=tok)

    def interrupt(event):
        if event["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)   # through the real signal handler

    cut = train(config(llama_dir, toy_data, tmp_path / "b", **kw), tokenizer=tok,
                callback=interrupt)
    assert cut.interrupted and cut.steps == 3 and cut.artifact is None
    with pytest.raises(TrainingError, match="already holds a training run"):
        train(config(llama_dir, toy_data, tmp_path / "b", **kw), tokenizer=tok)
    with pytest.raises(TrainingError, match="does not fit this run's method/targets"):
        train(config(llama_dir, toy_data, tmp_path / "b", resume=True, targets="q,k,v", **kw),
              tokenizer=tok)
    resumed = train(config(llama_dir, toy_data, tmp_path / "b", resume=True, **kw),
                    tokenizer=tok)
    assert resumed.steps == 6
    a, b = adapter_tensors(full), adapter_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [e["loss"] for e in full.history if e["type"] == "step"]
    assert losses[3:] == [e["loss"] for e in resumed.history if e["type"] == "step"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, llama_dir, toy_data):
    model = load_model(llama_dir)
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 3 else output

    model.lm_head.register_forward_hook(poison)
    cfg = config(llama_dir, toy_data, tmp_path / "run", save_every=2)
    with pytest.raises(TrainingError, match=r"loss became nan at step 4.*step-00000002"):
        train(cfg, model=model, tokenizer=get_tokenizer(llama_dir))
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert ckpt.step == 2 and all(torch.isfinite(t).all() for t in ckpt.trainable.values())


def test_output_folder_rules(tmp_path, llama_dir, toy_data):
    tok = get_tokenizer(llama_dir)
    with pytest.raises(TrainingError, match="holds no checkpoint"):
        train(config(llama_dir, toy_data, tmp_path / "x", resume=True), tokenizer=tok)
    train(config(llama_dir, toy_data, tmp_path / "x", steps=1), tokenizer=tok)
    with pytest.raises(TrainingError, match="--resume to continue it or --overwrite"):
        train(config(llama_dir, toy_data, tmp_path / "x", steps=1), tokenizer=tok)
    again = train(config(llama_dir, toy_data, tmp_path / "x", steps=2, overwrite=True),
                  tokenizer=tok)
    log = [json.loads(line) for line in (tmp_path / "x" / "log.jsonl").read_text().splitlines()]
    assert again.steps == 2 and [r["step"] for r in log] == [1, 2]
    with pytest.raises(ConfigError, match="steps or epochs"):
        config(llama_dir, toy_data, tmp_path / "y", epochs=1)


def test_lora_adapter_loads_in_peft_with_the_same_outputs(tmp_path, llama_dir, toy_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(config(llama_dir, toy_data, tmp_path / "run", steps=3, lr=5e-2,
                          targets="all-linear", r=4, alpha=8),
                   tokenizer=get_tokenizer(llama_dir))
    assert any(t.abs().max() > 0 for k, t in adapter_tensors(result).items() if "lora_B" in k)
    oracle = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir),
                                       str(result.artifact)).eval()
    ids = torch.randint(2, 300, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(ids), oracle(ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_trains_a_transformers_model_with_eval_and_checkpointing(tmp_path, llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = get_tokenizer(llama_dir)
    data = write_jsonl(tmp_path / "d.jsonl", toy_records(10))
    cfg = config(llama_dir, data, tmp_path / "run", steps=4, val_split=0.2, eval_every=2,
                 grad_checkpointing=True)
    hf = AutoModelForCausalLM.from_pretrained(llama_dir)
    events = []
    result = train(cfg, model=hf, tokenizer=tok, callback=events.append)
    evals = [e for e in events if e["type"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4]
    assert evals[0]["perplexity"] == pytest.approx(torch.tensor(evals[0]["eval_loss"]).exp().item())
    steps = [e for e in events if e["type"] == "step"]
    assert all(e["tokens_per_s"] > 0 and e["lr"] > 0 for e in steps)
    # The same run on our model (no checkpointing) gives the same adapter: one trainer, two
    # model implementations, and checkpointing does not change the math.
    ours = train(config(llama_dir, data, tmp_path / "ours", steps=4, val_split=0.2,
                        eval_every=2), tokenizer=tok)
    a, b = adapter_tensors(result), adapter_tensors(ours)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir),
                                         str(result.artifact))
    ids = torch.randint(2, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, hf.eval()(ids).logits)


def test_learning_rate_schedule(tmp_path):
    cfg = TrainConfig(model="m", data="d", out="o", lr=1.0, warmup=10, schedule="cosine",
                      min_lr_ratio=0.1)
    assert learning_rate(0, cfg, 110) == pytest.approx(0.1)
    assert learning_rate(9, cfg, 110) == pytest.approx(1.0)
    assert learning_rate(60, cfg, 110) == pytest.approx(0.55)
    assert learning_rate(110, cfg, 110) == pytest.approx(0.1)
    cfg.schedule = "linear"
    assert learning_rate(60, cfg, 110) == pytest.approx(0.55)
    assert learning_rate(35, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.75)


def run_cli(args, env=None, cmd=None):
    cmd = cmd or [sys.executable, "-m", "lorafleet.cli"]
    return subprocess.run(cmd + ["train", "--no-progress"] + args, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300, cwd=REPO)


def test_cli_train_and_bad_data(tmp_path, llama_dir, toy_data):
    bad = write_jsonl(tmp_path / "bad.jsonl", [toy_records()[0], '{"prompt": 3}'])
    proc = run_cli(["--model", str(llama_dir), "--data", str(bad), "--out", str(tmp_path / "o")])
    assert proc.returncode == 1
    assert "bad.jsonl:2" in proc.stderr and '"prompt" must be a string' in proc.stderr
    proc = run_cli(["--model", str(llama_dir), "--data", str(bad), "--out", str(tmp_path / "o"),
                    "--skip-bad-lines", "--steps", "2", "--targets", "all-linear"])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "adapter" / "adapter_config.json").is_file()
    assert "1 malformed lines skipped" in proc.stderr


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", toy_records(8))
    common = ["--model", str(llama_dir), "--data", str(data), "--steps", "3", "--lr", "1e-2",
              "--targets", "all-linear", "--device", "cpu"]
    single = run_cli(common + ["--out", str(tmp_path / "one"), "--batch-size", "4"])
    assert single.returncode == 0, single.stderr
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2",
                "--master_port", "29517", "-m", "lorafleet.cli"]
    double = run_cli(common + ["--out", str(tmp_path / "two"), "--batch-size", "2"],
                     env={"OMP_NUM_THREADS": "1"}, cmd=torchrun)
    assert double.returncode == 0, double.stderr
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert any(t.abs().max() > 0 for k, t in a.items() if "lora_B" in k)
    # Not bit-exact (sums in another order); Adam turns a tiny gradient difference on a
    # near-zero gradient into at most ~lr-sized steps, so allow 1% of lr, far below a real bug.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)


def test_bf16_autocast_with_gradient_checkpointing_on_our_model(tmp_path, llama_dir, toy_data):
    result = train(config(llama_dir, toy_data, tmp_path / "run", steps=3, bf16=True,
                          grad_checkpointing=True, method="adapter"),
                   tokenizer=get_tokenizer(llama_dir))
    losses = [e["loss"] for e in result.history if e["type"] == "step"]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    # autocast computes in bf16 but the trained parameters stay fp32
    assert all(p.dtype == torch.float32 for p in result.model.parameters() if p.requires_grad)
