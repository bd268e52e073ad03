"""DoRA (`use_dora`) against PEFT: files both ways, init, gradients, merge/unmerge, the checkpoint
merge, per-row batches, and the errors for adapters that do not fit."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import lorafleet as lf
from lorafleet.errors import AdapterError, ConfigError
from lorafleet.lora import LoraConfig, inject_lora, row_adapters
from lorafleet.lora.peft_format import load_peft
from lorafleet.lora.peft_model import save_adapter

from .lora_helpers import hf_model, logits, peft_random

ATOL = 1e-5


def _peft_dora(base_dir, seed=0, **config):
    """A PEFT DoRA model with random A, B and a magnitude that is not ||W0 + sBA|| (with the
    initial magnitude DoRA equals plain LoRA, which would test nothing of the rescale)."""
    model = peft_random(base_dir, seed=seed, use_dora=True, **config)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(0.5 + torch.rand(param.shape, generator=g))
    return model


CONFIGS = {
    "llama": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "gpt2": dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], use_rslora=True),
}


@pytest.fixture(params=["llama", "gpt2"])
def family(request, llama_dir, gpt2_dir):
    return request.param, {"llama": llama_dir, "gpt2": gpt2_dir}[request.param]


def test_reads_and_writes_peft_dora(family, tmp_path, ids):
    kind, base = family
    oracle = _peft_dora(base, **CONFIGS[kind])
    oracle.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["use_dora"]
    ours = lf.load_adapter(hf_model(base), tmp_path / "peft")
    expected = logits(oracle, ids)
    with oracle.disable_adapter():
        assert not torch.allclose(expected, logits(oracle, ids), atol=1e-3)
    torch.testing.assert_close(logits(ours, ids), expected, atol=ATOL, rtol=0)

    # our file: PEFT's key names (lora_magnitude_vector) and values, and PEFT loads it
    save_adapter(ours, tmp_path / "ours")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(mine) == sorted(theirs)
    assert any(k.endswith(".lora_magnitude_vector") for k in mine)
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], atol=0, rtol=0)
    import peft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(hf_model(base), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=ATOL, rtol=0)
    assert load_peft(tmp_path / "ours").modules[next(iter(load_peft(tmp_path / "ours").modules))
                                                ].use_dora


def test_init_and_gradients_equal_peft(llama_dir, ids):
    """Same seed -> same A, B and magnitude (m = ||W0 + sBA||); one backward -> same gradients
    (the norm detached, DoRA sec. 4.3)."""
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    oracle = peft_random(llama_dir, seed=3, use_dora=True, r=4, lora_alpha=8,
                         target_modules=["q_proj", "v_proj"]).train()
    torch.manual_seed(3)
    ours = inject_lora(hf_model(llama_dir), LoraConfig(use_dora=True, **config)).train()
    theirs = {k.replace(".default", ""): v for k, v in oracle.named_parameters() if v.requires_grad}
    mine = {"base_model.model." + k.replace(".default", ""): v
            for k, v in ours.named_parameters() if v.requires_grad}
    assert sorted(k.replace(".weight", "") if "magnitude" in k else k for k in theirs) == sorted(mine)
    for key, value in mine.items():
        other = theirs.get(key, theirs.get(key + ".weight"))
        torch.testing.assert_close(value, other, atol=1e-6, rtol=0)
    with torch.no_grad():   # move m away from its initial value so the rescale matters
        for value in mine.values():
            if value.ndim == 1:
                value.mul_(1.3)
        for key, value in theirs.items():
            if "magnitude" in key:
                value.mul_(1.3)
    oracle(input_ids=ids, labels=ids).loss.backward()
    ours(input_ids=ids, labels=ids).loss.backward()
    for key, value in mine.items():
        other = theirs.get(key, theirs.get(key + ".weight"))
        assert value.grad is not None and value.grad.abs().sum() > 0, key
        torch.testing.assert_close(value.grad, other.grad, atol=1e-5, rtol=1e-4)


def test_merge_unmerge_equal_peft(family, tmp_path, ids):
    kind, base = family
    oracle = _peft_dora(base, seed=1, **CONFIGS[kind])
    oracle.save_pretrained(tmp_path / "peft")
    ours = lf.load_adapter(hf_model(base), tmp_path / "peft")
    before = {k: v.clone() for k, v in ours.state_dict().items() if "base_layer.weight" in k}
    expected = logits(oracle, ids)
    lf.merge(ours, "default")
    torch.testing.assert_close(logits(ours, ids), expected, atol=ATOL, rtol=0)
    merged_peft = oracle.merge_and_unload().state_dict()
    for key, value in ours.state_dict().items():
        if "base_layer.weight" in key:
            torch.testing.assert_close(value, merged_peft[key.replace(".base_layer", "")],
                                       atol=1e-6, rtol=0)
    lf.unmerge(ours)
    for key, value in before.items():
        torch.testing.assert_close(ours.state_dict()[key], value, atol=1e-5, rtol=0)
    # the checkpoint-folder merge (tensor arithmetic, no model code) gives PEFT's weights too
    report = lf.merge_checkpoint(base, tmp_path / "peft", tmp_path / "merged")
    assert report.merged
    merged = hf_model(tmp_path / "merged")
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-4, rtol=0)


def test_mixed_rows_dora_lora_and_base_equal_peft_per_request(llama_dir, tmp_path, ids):
    target = ["q_proj", "v_proj", "up_proj"]
    dora = _peft_dora(llama_dir, seed=2, r=4, lora_alpha=8, target_modules=target)
    plain = peft_random(llama_dir, seed=5, r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"])
    dora.save_pretrained(tmp_path / "d")
    plain.save_pretrained(tmp_path / "p")
    model = lf.load_adapter(hf_model(llama_dir), tmp_path / "d", adapter_name="d")
    lf.load_adapter(model, tmp_path / "p", adapter_name="p")
    names = ["d", "p", None]
    with row_adapters(model, names):
        mixed = logits(model, ids)
    torch.testing.assert_close(mixed[0], logits(dora, ids[:1])[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], logits(plain, ids[1:2])[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[2], logits(hf_model(llama_dir), ids[2:])[0], atol=ATOL, rtol=0)


def test_bad_dora_input_names_the_field(llama_dir, tmp_path):
    _peft_dora(llama_dir, r=2, target_modules=["q_proj"]).save_pretrained(tmp_path / "d")
    config = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    (tmp_path / "d" / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=False)))
    with pytest.raises(ConfigError, match="use_dora=False.*lora_magnitude_vector"):
        load_peft(tmp_path / "d")
    with pytest.raises(AdapterError, match="use_dora on an Embedding"):
        inject_lora(hf_model(llama_dir), LoraConfig(use_dora=True, target_modules=["embed_tokens"]))
    with pytest.raises(ConfigError, match="use_dora"):
        LoraConfig(use_dora="yes")


def test_engine_registry_lays_out_the_magnitude(llama_dir, tmp_path):
    """A DoRA adapter takes one more row of B^T-sized pages per module: its magnitude."""
    from lorafleet.serve.adapter_registry import BaseLayout, read_spec

    _peft_dora(llama_dir, r=2, target_modules=["q_proj"]).save_pretrained(tmp_path / "d")
    targets = {n: (m.in_features, m.out_features) for n, m in hf_model(llama_dir).named_modules()
               if n.endswith("q_proj")}
    spec = read_spec("mine", tmp_path / "d", BaseLayout(targets, 32, 16))
    assert spec.dora
    pages = {n: 2 * (-(-i // 32)) + 3 * (-(-o // 32)) for n, (i, o) in targets.items()}
    assert spec.num_pages == sum(pages.values())
    slices = list(spec.modules.values())
    assert all(s.m_page == s.b_page + 2 * s.b_pages_per_row for s in slices)


def test_dora_over_a_4bit_base_equals_dora_over_its_dequantized_weight():
    """The QLoRA case: DoRA's norm uses the dequantized NF4 weight (as PEFT does with bnb's);
    merging into the 4-bit base dequantizes, rescales and requantizes (it rounds)."""
    from torch import nn

    from lorafleet.lora import LoraLinear
    from lorafleet.quant import Linear4bit

    torch.manual_seed(0)
    quantized = Linear4bit.from_module(nn.Linear(128, 64))
    reference = nn.Linear(128, 64)
    with torch.no_grad():
        reference.weight.copy_(quantized.weight)
        reference.bias.copy_(quantized.bias)
    layers = [LoraLinear(quantized), LoraLinear(reference)]
    for layer in layers:
        torch.manual_seed(1)
        layer.add_adapter("d", 4, 8, 2.0, init=False, use_dora=True)
        with torch.no_grad():
            layer.lora_magnitude_vector["d"].mul_(torch.linspace(0.5, 1.5, 64))
    x = torch.randn(5, 128)
    expected = layers[1](x, "d")
    torch.testing.assert_close(layers[0](x, "d"), expected, atol=1e-5, rtol=0)
    layers[0].merge("d")
    layers[1].merge("d")
    torch.testing.assert_close(layers[1].base_layer(x), expected, atol=1e-5, rtol=0)
    exact = layers[1].base_layer.weight.detach()
    error = (layers[0].base_layer.weight - exact).abs()   # NF4 rounding: a step at most
    assert error.max() < 0.3 * exact.abs().max() and error.mean() < 0.02 * exact.abs().max()



def test_training_forward_with_dropout_equals_peft(llama_dir, tmp_path, ids):
    """With lora_dropout in training, the dropped-out input goes through the base as well
    (PEFT's DoRA); the same seed draws the same masks in both."""
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.3)
    oracle = _peft_dora(llama_dir, seed=4, **config)
    oracle.save_pretrained(tmp_path / "p")
    ours = lf.load_adapter(hf_model(llama_dir), tmp_path / "p", is_trainable=True).train()
    oracle.train()
    torch.manual_seed(11)
    expected = oracle(input_ids=ids, labels=ids).loss
    torch.manual_seed(11)
    got = ours(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.manual_seed(11)
    assert not torch.allclose(oracle.eval()(input_ids=ids, labels=ids).loss, expected, atol=1e-4)
