"""Same outputs as PEFT (fp32, 1e-5) on small random transformers models, both file directions."""
import pytest
import torch
from .lora_helpers import hf_model, logits, peft_random

import lorafleet as lf

ATOL = 1e-5


def _roundtrip_from_peft(base_dir, tmp_path, ids, **config):
    oracle = peft_random(base_dir, **config)
    oracle.save_pretrained(tmp_path / "peft")
    ours = lf.load_adapter(hf_model(base_dir), tmp_path / "peft")
    expected = logits(oracle, ids)
    assert not torch.allclose(expected, logits(hf_model(base_dir), ids), atol=1e-3), \
        "adapter must change the output for the comparison to mean anything"
    torch.testing.assert_close(logits(ours, ids), expected, atol=ATOL, rtol=0)
    return oracle, ours


@pytest.mark.parametrize("config", [
    dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    dict(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    dict(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
         rank_pattern={"k_proj": 2, r"layers\.1\.self_attn\.o_proj": 3},
         alpha_pattern={"down_proj": 32}),
    dict(r=4, lora_alpha=8, target_modules=r".*\.(q|v)_proj", layers_to_transform=None),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"]),
], ids=["qv", "all-linear-rslora", "patterns", "regex", "layers", "embedding"])
def test_llama_reads_peft_adapters(llama_dir, tmp_path, ids, config):
    _roundtrip_from_peft(llama_dir, tmp_path, ids, **config)


# GPT-2: fused c_attn and Conv1D weights [in, out] (fan_in_fan_out) under the same features.
@pytest.mark.parametrize("config", [
    dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], use_rslora=True),
    dict(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    dict(r=8, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
         rank_pattern={"c_fc": 2, r"h\.1\.attn\.c_proj": 3}, alpha_pattern={"c_attn": 32}),
    dict(r=4, lora_alpha=8, target_modules=["c_attn", "wte"], use_rslora=True,
         rank_pattern={"wte": 2}, alpha_pattern={"wte": 2}),
], ids=["rslora", "all-linear-rslora", "patterns", "embedding-patterns"])
def test_gpt2_reads_peft_adapters(gpt2_dir, tmp_path, ids, config):
    _roundtrip_from_peft(gpt2_dir, tmp_path, ids, fan_in_fan_out=True, **config)


WRITTEN = {
    "llama": dict(target_modules=["q_proj", "v_proj", "gate_proj", "embed_tokens"],
                  rank_pattern={"gate_proj": 2}, alpha_pattern={"v_proj": 4}),
    "gpt2": dict(target_modules=["c_attn", "c_proj", "wte"], fan_in_fan_out=True,
                 rank_pattern={r"h\.0\.mlp\.c_proj": 2}, alpha_pattern={"c_attn": 4}),
}


@pytest.mark.parametrize("family", list(WRITTEN))
def test_written_adapter_loads_in_peft(request, tmp_path, ids, family):
    import peft

    base_dir = request.getfixturevalue(f"{family}_dir")
    torch.manual_seed(0)
    model = lf.inject_lora(hf_model(base_dir), lf.LoraConfig(
        r=4, lora_alpha=16, use_rslora=True, init_lora_weights=False, **WRITTEN[family]))
    lf.save_adapter(model, tmp_path / "ours")
    assert lf.LoraConfig.from_peft(tmp_path / "ours").base_model_name_or_path == str(base_dir)
    oracle = peft.PeftModel.from_pretrained(hf_model(base_dir), tmp_path / "ours").eval()
    expected = logits(oracle, ids)
    assert not torch.allclose(expected, logits(hf_model(base_dir), ids), atol=1e-3)
    torch.testing.assert_close(logits(model.eval(), ids), expected, atol=ATOL, rtol=0)
