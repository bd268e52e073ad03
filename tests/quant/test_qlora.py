"""QLoRA end to end on a small random Llama: LoRA over the 4-bit base trains (only A and B get
gradients), its adapter loads into PEFT over the same NF4 base with the same outputs, and merging
into the 4-bit base requantizes with a warning."""
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F

from .quant_helpers import bnb_nf4_transformers

import lorafleet as lf
from lorafleet.lora import lora_layers
from lorafleet.models import load_model
from lorafleet.quant import Linear4bit, quantize_model

IDS = torch.randint(2, 384, (4, 24), generator=torch.Generator().manual_seed(3))


def qlora_model(path, double_quant=True, seed=0):
    model = quantize_model(load_model(path), double_quant=double_quant)
    torch.manual_seed(seed)
    return lf.inject_lora(model, lf.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


def adapter_weights(model):
    return {id(p) for _, layer in lora_layers(model) for name in layer.adapter_names
            for p in (layer.lora_A[name].weight, layer.lora_B[name].weight)}


def lm_loss(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train(model, steps=12, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, IDS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def trained(llama_dir):
    model = qlora_model(llama_dir, double_quant=False)
    losses = train(model)
    return model, losses


def test_lora_wraps_the_4bit_base_and_only_a_b_train(llama_dir):
    model = qlora_model(llama_dir)
    bases = [layer.base_layer for _, layer in lora_layers(model)]
    assert len(bases) == 14 and all(isinstance(b, Linear4bit) for b in bases)
    wanted = adapter_weights(model)
    assert {id(p) for p in model.parameters() if p.requires_grad} == wanted
    lm_loss(model, IDS).backward()
    got_grad = {id(p) for p in model.parameters() if p.grad is not None}
    assert got_grad == wanted
    assert all(b.codes.grad is None for b in bases)


@pytest.mark.slow
def test_qlora_training_lowers_the_loss(trained):
    _, losses = trained
    print(f"\nQLoRA loss: {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.slow
def test_adapter_loads_into_peft_over_the_same_nf4_base(trained, llama_dir, tmp_path):
    import peft

    model, _ = trained
    lf.save_adapter(model, tmp_path / "qlora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = peft.PeftModel.from_pretrained(bnb_nf4_transformers(llama_dir, False),
                                                tmp_path / "qlora").eval()
    with torch.no_grad():
        expected = oracle(input_ids=IDS).logits
        ours = model.eval()(IDS)
        base = bnb_nf4_transformers(llama_dir, False)(input_ids=IDS).logits
    assert (expected - base).abs().max() > 1e-2  # the trained adapter changes the output
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)


def test_merge_into_4bit_base_requantizes_with_warning(llama_dir, caplog):
    model = qlora_model(llama_dir, seed=1)
    with torch.no_grad():
        base = model(IDS)
        for _, layer in lora_layers(model):  # a small update, as a fine-tune typically makes
            layer.lora_B["default"].weight.normal_(std=2e-3)
        unmerged = model(IDS)
        with caplog.at_level(logging.WARNING, logger="lorafleet.quant"):
            lf.merge(model, "default")
        merged = model(IDS)
    assert "rounded to NF4" in caplog.text

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    print(f"\nmerge into NF4: adapter moves logits by {rel(unmerged, base):.4f}, requantizing "
          f"the merge moves them by {rel(merged, unmerged):.4f}")
    # The merged weight stays on the base's NF4 grid: an update smaller than half an NF4 step is
    # rounded away (so the merge error is about the adapter's own effect), but no fresh 4-bit
    # error (~0.1 of the logits, test_linear4bit) is added on top.
    assert 0 < rel(merged, unmerged) < 1.5 * rel(unmerged, base)
    assert rel(merged, base) > 0  # some codes did move


def test_gpt2_qlora_adapter_loads_into_peft_over_bnb_nf4(gpt2_dir, tmp_path, caplog):
    """GPT-2's Conv1D layers become [out, in] Linear4bit; the adapter's A/B are the same tensors
    PEFT keeps with fan_in_fan_out, so PEFT over the bnb-NF4 base gives our outputs."""
    import bitsandbytes.functional as bnbF
    import peft
    from transformers import AutoModelForCausalLM

    model = quantize_model(load_model(gpt2_dir), double_quant=False)
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="lorafleet"):
        lf.inject_lora(model, lf.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                            fan_in_fan_out=True, init_lora_weights=False))
    # GPT-2's PEFT config says fan_in_fan_out and the 4-bit layers came from Conv1D: no warning
    assert "fan_in_fan_out" not in caplog.text
    lf.save_adapter(model, tmp_path / "qlora")
    base = AutoModelForCausalLM.from_pretrained(gpt2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for module in base.modules():
            if type(module).__name__ == "Conv1D":  # weight [in, out]: quantize as [out, in]
                packed, state = bnbF.quantize_4bit(module.weight.t().contiguous(), blocksize=64,
                                                   quant_type="nf4")
                module.weight.copy_(bnbF.dequantize_4bit(packed, state).t())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = peft.PeftModel.from_pretrained(base, tmp_path / "qlora").eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IDS[:, :12]), oracle(input_ids=IDS[:, :12]).logits,
                                   rtol=0, atol=1e-5)


@pytest.mark.slow
def test_trainer_qlora_streams_nf4_and_its_adapter_loads_into_peft(llama_dir, tmp_path):
    """`train(method="qlora")` builds its base by streaming the checkpoint into NF4 (never a
    float32 model); the adapter it writes loads into PEFT over bitsandbytes' NF4 base of the
    same checkpoint and gives the trained model's outputs."""
    import json

    import peft

    from lorafleet.train import TrainConfig, train
    from tests.train.conftest import toy_records, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", toy_records(8))
    result = train(TrainConfig.from_flat(model=str(llama_dir), data=str(data),
                                         out=str(tmp_path / "run"), method="qlora", steps=6,
                                         lr=1e-2, batch_size=4, targets="all-linear"))
    config = json.loads((result.artifact / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and len(config["target_modules"]) == 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = peft.PeftModel.from_pretrained(bnb_nf4_transformers(llama_dir, True),
                                                result.artifact).eval()
        base = bnb_nf4_transformers(llama_dir, True)
    with torch.no_grad():
        expected = oracle(input_ids=IDS).logits
        assert (expected - base(input_ids=IDS).logits).abs().max() > 1e-2  # it learned something
        torch.testing.assert_close(result.model.eval()(IDS), expected, rtol=0, atol=1e-4)
