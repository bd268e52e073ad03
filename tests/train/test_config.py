"""TrainConfig holds a MethodConfig (one copy of the method's fields); `lorafleet train` builds
its flags from the dataclass fields (one copy of defaults and help); --dtype for the frozen base."""
import argparse
import dataclasses

import pytest
import torch

from lorafleet.cli import build_parser
from lorafleet.errors import ConfigError
from lorafleet.lora import lora_layers
from lorafleet.models import load_model
from lorafleet.quant import Linear4bit, quantize_model
from lorafleet.train import MethodConfig, TrainConfig, train

from .conftest import get_tokenizer


def test_from_flat_sorts_keys_into_the_method_config():
    cfg = TrainConfig.from_flat(model="m", data="d", out="o", method="qlora", r=16, alpha=32,
                                targets="all-linear", lr=1e-3)
    assert cfg.method == MethodConfig("qlora", r=16, alpha=32, targets="all-linear")
    assert cfg.lr == 1e-3
    assert TrainConfig(**{**dataclasses.asdict(cfg)}) == cfg  # train_config.json round trip
    with pytest.raises(ConfigError, match="unknown training setting.*'rank'"):
        TrainConfig.from_flat(model="m", data="d", out="o", rank=4)
    with pytest.raises(ConfigError, match="method: expected a MethodConfig"):
        TrainConfig(model="m", data="d", out="o", method="lora")
    with pytest.raises(ConfigError, match="dtype: unknown dtype 'fp8'"):
        TrainConfig(model="m", data="d", out="o", dtype="fp8")


def train_parser() -> argparse.ArgumentParser:
    subparsers = build_parser()._subparsers._group_actions[0]
    return subparsers.choices["train"]


def test_cli_flags_come_from_the_dataclass_fields():
    from lorafleet.cli.train import config_from_args
    parser = train_parser()
    args = parser.parse_args(["--model", "m", "--data", "d", "--out", "o"])
    assert config_from_args(args) == TrainConfig(model="m", data="d", out="o")
    flags = {a.option_strings[0]: a for a in parser._actions}
    for cls in (TrainConfig, MethodConfig):
        for f in dataclasses.fields(cls):
            if "help" in f.metadata:  # every documented field is a flag with its help
                action = flags["--" + f.name.replace("_", "-")]
                assert f.metadata["help"].replace("%", "%%") in action.help, f.name
    args = parser.parse_args(["--model", "m", "--data", "d", "--out", "o", "--fsdp"])
    assert config_from_args(args).parallel == "fsdp"
    args = parser.parse_args(["--model", "m", "--data", "d", "--out", "o", "--method", "qlora",
                              "--r", "4", "--grad-checkpointing", "--dtype", "bf16"])
    cfg = config_from_args(args)
    assert cfg.method.method == "qlora" and cfg.method.r == 4 and cfg.grad_checkpointing
    assert cfg.dtype == "bf16"


def test_lora_over_a_bf16_base_trains_float32_adapters(tmp_path, llama_dir, toy_data):
    tok = get_tokenizer(llama_dir)

    def run(dtype, name):
        return train(TrainConfig.from_flat(model=str(llama_dir), data=str(toy_data),
                                           out=str(tmp_path / name), steps=2, lr=1e-2,
                                           batch_size=4, targets="all-linear", dtype=dtype),
                     tokenizer=tok)

    half, full = run("bf16", "half"), run("float32", "full")
    layers = [layer for _, layer in lora_layers(half.model)]
    assert layers and all(layer.base_layer.weight.dtype == torch.bfloat16 for layer in layers)
    trained = [p for p in half.model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    # the bf16 base computes the same loss as the float32 one, to bf16's precision
    assert half.history[0]["loss"] == pytest.approx(full.history[0]["loss"], rel=2e-2)


def test_qlora_streams_the_same_nf4_base_as_quantizing_a_float32_model(tmp_path, llama_dir,
                                                                        toy_data):
    result = train(TrainConfig.from_flat(model=str(llama_dir), data=str(toy_data),
                                         out=str(tmp_path / "q"), method="qlora", steps=1,
                                         targets="all-linear"),
                   tokenizer=get_tokenizer(llama_dir))
    streamed = dict(result.model.named_modules())
    reference = quantize_model(load_model(llama_dir))
    compared = 0
    for name, module in reference.named_modules():
        if isinstance(module, Linear4bit):
            ours = streamed[name].base_layer if hasattr(streamed[name], "base_layer") \
                else streamed[name]
            assert isinstance(ours, Linear4bit)
            assert torch.equal(ours.codes, module.codes), name
            compared += 1
    assert compared == 14 and result.model.lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("kw, message", [
    (dict(dtype="fp16"), "--dtype fp16: cpu does not compute float16"),
    (dict(dtype="bf16", method="full"), "--method full trains in float32"),
])
def test_bad_dtype_is_refused(tmp_path, llama_dir, toy_data, kw, message):
    with pytest.raises(ConfigError, match=message):
        train(TrainConfig.from_flat(model=str(llama_dir), data=str(toy_data),
                                    out=str(tmp_path / "x"), steps=1, **kw),
              tokenizer=get_tokenizer(llama_dir))


def test_adamw8bit_trains_with_8bit_state_and_resumes_exactly(tmp_path, llama_dir, toy_data):
    pytest.importorskip("bitsandbytes")
    tok = get_tokenizer(llama_dir)
    # full: bitsandbytes keeps tensors under 4096 elements (the tiny model's LoRA A, B) in 32 bits
    values = dict(model=str(llama_dir), data=str(toy_data), steps=3, lr=1e-3, batch_size=2,
                  method="full", optim="adamw8bit")
    full = train(TrainConfig.from_flat(out=str(tmp_path / "a"), **values), tokenizer=tok)
    losses = [e["loss"] for e in full.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    cut = train(TrainConfig.from_flat(out=str(tmp_path / "b"), **values), tokenizer=tok,
                callback=lambda e: e["step"] == 1)
    assert cut.interrupted
    from lorafleet.train.checkpoint import latest_checkpoint, load_checkpoint
    def tensors(tree):
        if isinstance(tree, torch.Tensor):
            return [tree]
        return [t for v in tree.values() for t in tensors(v)] if isinstance(tree, dict) else []

    saved = tensors(load_checkpoint(latest_checkpoint(tmp_path / "b")).optimizer["state"])
    assert any(t.dtype == torch.uint8 and t.numel() >= 4096 for t in saved)  # 8-bit moments
    resumed = train(TrainConfig.from_flat(out=str(tmp_path / "b"), resume=True, **values),
                    tokenizer=tok)
    assert [e["loss"] for e in resumed.history] == losses[1:]


def test_paged_adamw_needs_cuda(tmp_path, llama_dir, toy_data):
    with pytest.raises(ConfigError, match="--optim paged_adamw .* needs CUDA"):
        train(TrainConfig.from_flat(model=str(llama_dir), data=str(toy_data),
                                    out=str(tmp_path / "p"), optim="paged_adamw", device="cpu"))
    assert not (tmp_path / "p").exists()
