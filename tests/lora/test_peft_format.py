"""PEFT adapter folders both ways (GPT-2 Conv1D, biases, modules_to_save), mixed per-row
batches against PEFT's `adapter_names=`, and every bad input the format can bring."""
import json

import pytest
import torch
from .lora_helpers import hf_model, logits, peft_random
from safetensors.torch import load_file, save_file

import lorafleet as lf
from lorafleet.lora.peft_format import read_adapter
from lorafleet.lora.peft_model import adapter_state_dict
from lorafleet.errors import AdapterError, ConfigError, ShapeError

ATOL = 1e-5


def _perturb_trainable_biases(model, seed=3):
    """Biases that train (and so are saved) get non-zero changes, as training would give."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("config", [
    dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, lora_alpha=16, r=4),
    dict(target_modules=["c_attn", "wte"], bias="lora_only", r=4),
    dict(target_modules=["c_fc"], bias="all", modules_to_save=["lm_head"], r=2),
], ids=["fan_in_fan_out", "lora_only+embedding", "all+modules_to_save"])
def test_gpt2_both_directions(gpt2_dir, tmp_path, ids, config):
    import peft

    oracle = peft_random(gpt2_dir, **config)
    _perturb_trainable_biases(oracle)
    if "modules_to_save" in config:
        with torch.no_grad():
            oracle.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    oracle.save_pretrained(tmp_path / "peft")
    expected = logits(oracle, ids)
    assert not torch.allclose(expected, logits(hf_model(gpt2_dir), ids), atol=1e-3)
    ours = lf.load_adapter(hf_model(gpt2_dir), tmp_path / "peft")
    torch.testing.assert_close(logits(ours, ids), expected, atol=ATOL, rtol=0)
    # and back: what we write, PEFT reads to the same outputs
    lf.save_adapter(ours, tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "peft" / "adapter_model.safetensors")) - {
        k for k in load_file(tmp_path / "peft" / "adapter_model.safetensors")
        if k.endswith("wte.base_layer.weight")}
    again = peft.PeftModel.from_pretrained(hf_model(gpt2_dir), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(again, ids), expected, atol=ATOL, rtol=0)


# family -> (adapter "a" targets, adapter "b" targets): b overlaps a and adds an embedding.
TWO_ADAPTERS = {
    "llama": (["q_proj", "v_proj"], ["k_proj", "gate_proj", "v_proj", "embed_tokens"]),
    "gpt2": (["c_attn"], ["c_attn", "c_fc", "wte"]),
}


def _two_peft_adapters(base_dir, tmp_path, family):
    import peft

    targets_a, targets_b = TWO_ADAPTERS[family]
    gpt2 = family == "gpt2"
    oracle = peft_random(base_dir, "a", r=4, lora_alpha=8, target_modules=targets_a,
                         fan_in_fan_out=gpt2)
    torch.manual_seed(5)
    oracle.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=4, use_rslora=True, init_lora_weights=False,
                                            target_modules=targets_b, fan_in_fan_out=gpt2))
    oracle.save_pretrained(tmp_path / "peft")  # non-"default" adapters go to peft/<name>/
    return oracle.eval()


@pytest.mark.parametrize("family", list(TWO_ADAPTERS))
def test_mixed_batch_matches_peft_adapter_names(request, tmp_path, ids, family):
    base_dir = request.getfixturevalue(f"{family}_dir")
    oracle = _two_peft_adapters(base_dir, tmp_path, family)
    model = hf_model(base_dir)
    for name in ("a", "b"):
        lf.load_adapter(model, tmp_path / "peft" / name, adapter_name=name)
    rows = ["b", None, "a"]
    expected = logits(oracle, ids, adapter_names=[r or "__base__" for r in rows])
    with lf.row_adapters(model, rows):
        got = logits(model, ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1], logits(hf_model(base_dir), ids)[1], atol=ATOL, rtol=0)
    assert not torch.allclose(got[0], got[2], atol=1e-3)  # rows really differ
    assert not torch.allclose(got[0], got[1], atol=1e-3)
    lf.set_adapter(model, "b")
    oracle.set_adapter("b")
    torch.testing.assert_close(logits(model, ids), logits(oracle, ids), atol=ATOL, rtol=0)
    with pytest.raises(AdapterError, match="unknown adapter"):
        with lf.row_adapters(model, ["a", "zzz", None]):
            pass


def test_merged_equals_unmerged_and_unmerge_restores(llama_dir, ids):
    torch.manual_seed(0)
    model = lf.inject_lora(hf_model(llama_dir), lf.LoraConfig(
        target_modules="all-linear", r=4, lora_alpha=16, init_lora_weights=False))
    lf.inject_lora(model, lf.LoraConfig(target_modules=["embed_tokens", "q_proj"], init_lora_weights=False), "emb")
    lf.set_adapter(model, "default")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    expected = logits(model, ids)
    lf.merge(model, "default")
    torch.testing.assert_close(logits(model, ids), expected, atol=ATOL, rtol=0)
    lf.unmerge(model)
    for name, param in model.named_parameters():
        if name in before:
            torch.testing.assert_close(param, before[name], atol=1e-6, rtol=0)
    lf.set_adapter(model, "emb")
    expected = logits(model, ids)
    lf.merge(model, "emb")
    torch.testing.assert_close(logits(model, ids), expected, atol=ATOL, rtol=0)
    plain = lf.unload(model)
    assert not lf.adapter_names(plain)
    torch.testing.assert_close(logits(plain, ids), expected, atol=ATOL, rtol=0)


def test_merge_equals_peft_merge_and_unload(gpt2_dir):
    from peft import get_peft_model_state_dict

    from lorafleet.lora.peft_model import load_adapter_state_dict

    config = dict(target_modules=["c_attn", "c_fc", "wte"], r=4, lora_alpha=8)
    oracle = peft_random(gpt2_dir, **config)
    tensors = {k: v.clone() for k, v in get_peft_model_state_dict(oracle).items()}
    merged_by_peft = oracle.merge_and_unload().state_dict()
    ours = lf.inject_lora(hf_model(gpt2_dir), lf.LoraConfig(**config))
    load_adapter_state_dict(ours, tensors)
    plain = lf.unload(ours, "default").state_dict()
    assert set(plain) == set(merged_by_peft)
    for key, value in merged_by_peft.items():
        torch.testing.assert_close(plain[key], value, atol=1e-6, rtol=0)


# -- bad input ------------------------------------------------------------------------------------
@pytest.fixture
def peft_dir(llama_dir, tmp_path):
    peft_random(llama_dir, r=4, target_modules=["q_proj", "v_proj"]).save_pretrained(tmp_path / "a")
    return tmp_path / "a"


def test_shape_mismatch_names_key_and_shapes(llama_dir, peft_dir):
    file = peft_dir / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = torch.zeros(48, 4)
    save_file(tensors, file)
    with pytest.raises(ShapeError) as err:
        lf.load_adapter(hf_model(llama_dir), peft_dir)
    assert key in str(err.value) and "(32, 4)" in str(err.value) and "(48, 4)" in str(err.value)


def test_pickle_refused(llama_dir, peft_dir):
    (peft_dir / "adapter_model.safetensors").rename(peft_dir / "adapter_model.bin")
    with pytest.raises(AdapterError, match="safetensors"):
        lf.load_adapter(hf_model(llama_dir), peft_dir)


def test_config_errors_and_warnings(llama_dir, peft_dir):
    config_file = peft_dir / "adapter_config.json"
    data = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(dict(data, peft_type="PREFIX_TUNING")))
    with pytest.raises(ConfigError, match="peft_type"):
        read_adapter(peft_dir)
    config_file.write_text(json.dumps({k: v for k, v in data.items() if k != "peft_type"}))
    with pytest.raises(ConfigError, match="peft_type"):
        read_adapter(peft_dir)
    config_file.write_text(json.dumps(dict(data, use_dora=True)))
    with pytest.raises(ConfigError, match="use_dora"):
        read_adapter(peft_dir)
    config_file.write_text(json.dumps(dict(data, shiny_new_option=3)))
    with pytest.warns(UserWarning, match="shiny_new_option"):
        model = lf.load_adapter(hf_model(llama_dir), peft_dir)
    assert lf.adapter_names(model) == ["default"]


def test_keys_that_fit_nothing_and_missing_tensors(llama_dir, peft_dir):
    file = peft_dir / "adapter_model.safetensors"
    tensors = load_file(file)
    extra = dict(tensors, **{"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)})
    save_file(extra, file)
    with pytest.raises(AdapterError, match="up_proj"):
        lf.load_adapter(hf_model(llama_dir), peft_dir)
    save_file({k: v for k, v in tensors.items() if "layers.1.self_attn.q_proj.lora_A" not in k}, file)
    with pytest.raises(AdapterError, match="lacks 1 tensors"):
        lf.load_adapter(hf_model(llama_dir), peft_dir)
    with pytest.raises(AdapterError, match="not a folder"):
        read_adapter(peft_dir / "nope")
    model = lf.inject_lora(hf_model(llama_dir), lf.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match="no adapter named"):
        adapter_state_dict(model, "other")
