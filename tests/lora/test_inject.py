"""Target selection (PEFT's rules, checked against PEFT), freezing, parameter counts."""
import pytest
import torch
from .lora_helpers import hf_model, peft_random
from torch import nn

import lorafleet as lf
from lorafleet.errors import AdapterError, ConfigError, TargetError
from lorafleet.lora import LoraEmbedding, LoraLinear, find_targets, lora_layers
from lorafleet.lora.inject import layer_index, pattern_key


def _names(model, cls=(LoraLinear, LoraEmbedding)):
    return sorted(n for n, m in model.named_modules() if isinstance(m, cls))


def _peft_names(model):
    from peft.tuners.lora import LoraLayer

    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                  if isinstance(m, LoraLayer))


@pytest.mark.parametrize("config", [
    dict(target_modules="all-linear"),
    dict(target_modules=["q_proj", "mlp.up_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]),
    dict(target_modules=r"model\.layers\.\d\.self_attn\.(k|o)_proj", exclude_modules=r".*\.0\..*"),
    dict(target_modules=["v_proj", "down_proj"], layers_to_transform=0, layers_pattern="layers"),
    dict(target_modules=None),
])
def test_same_targets_as_peft(llama_dir, config):
    ours = lf.inject_lora(hf_model(llama_dir), lf.LoraConfig(**config))
    assert _names(ours) == _peft_names(peft_random(llama_dir, **config)) != []


def test_all_linear_skips_head_gpt2(gpt2_dir):
    ours = lf.inject_lora(hf_model(gpt2_dir), lf.LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in _names(ours) and len(_names(ours)) == 8
    assert _names(ours) == _peft_names(peft_random(gpt2_dir, target_modules="all-linear"))


def test_layer_index_and_pattern_key_rules():
    assert layer_index("model.layers.3.self_attn.q_proj") == 3
    assert layer_index("transformer.h.11.attn.c_attn") == 11
    assert layer_index("model.layers.1.experts.0.w1") == 1  # first index, not the expert's
    assert layer_index("blocks.2.attn", layers_pattern="blocks") == 2
    assert layer_index("lm_head") is None
    assert pattern_key(["k_proj"], "model.layers.0.self_attn.k_proj") == "k_proj"
    assert pattern_key([r"layers\.1\.self_attn\.o_proj"], "model.layers.1.self_attn.o_proj")
    assert pattern_key(["proj"], "model.layers.0.self_attn.k_proj") is None  # whole segment


def test_freezing_and_bias_modes(gpt2_dir):
    model = lf.inject_lora(hf_model(gpt2_dir), lf.LoraConfig(target_modules=["c_attn"], r=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.attn.c_attn.lora_{ab}.default.weight"
                         for i in range(2) for ab in "AB"}
    model = lf.inject_lora(hf_model(gpt2_dir), lf.LoraConfig(target_modules=["c_attn"], bias="lora_only"))
    assert {n for n, p in model.named_parameters() if p.requires_grad and "bias" in n} == {
        f"transformer.h.{i}.attn.c_attn.base_layer.bias" for i in range(2)}
    ours = lf.inject_lora(hf_model(gpt2_dir), lf.LoraConfig(target_modules=["c_attn"], bias="all"))
    oracle = peft_random(gpt2_dir, target_modules=["c_attn"], bias="all")
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n.removeprefix("base_model.model.")
        for n, p in oracle.named_parameters() if p.requires_grad}


def test_modules_to_save_and_second_adapter(llama_dir):
    model = lf.inject_lora(hf_model(llama_dir), lf.LoraConfig(target_modules=["q_proj"],
                                                                modules_to_save=["lm_head"]))
    assert {n for n, p in model.named_parameters() if p.requires_grad and "lm_head" in n} == {
        "lm_head.modules_to_save.default.weight"}
    lf.inject_lora(model, lf.LoraConfig(target_modules=["q_proj", "v_proj"], r=2), "second")
    q = model.model.layers[0].self_attn.q_proj
    assert q.adapter_names == ["default", "second"] and q.active_adapter == "second"
    assert not q.lora_A["default"].weight.requires_grad and q.lora_A["second"].weight.requires_grad
    assert lf.adapter_names(model) == ["default", "second"]
    with pytest.raises(AdapterError, match="already exists"):
        lf.inject_lora(model, lf.LoraConfig(target_modules=["q_proj"]), "second")


def test_no_match_lists_existing_names(llama_dir):
    with pytest.raises(TargetError, match="q_proj") as err:
        lf.inject_lora(hf_model(llama_dir), lf.LoraConfig(target_modules=["query"]))
    assert "query" in str(err.value)
    with pytest.raises(TargetError, match="matched no module"):
        lf.inject_lora(hf_model(llama_dir), lf.LoraConfig(target_modules=["q_proj"],
                                                          layers_to_transform=[7]))
    with pytest.raises(TargetError, match="cannot take LoRA"):
        lf.inject_lora(hf_model(llama_dir), lf.LoraConfig(target_modules=["input_layernorm"]))
    with pytest.raises(ConfigError, match="target_modules"):
        lf.inject_lora(nn.Sequential(nn.Linear(2, 2)), lf.LoraConfig())


class _Stand_in(nn.Module):
    """Attention projections of a transformer, enough for LoRA's parameter arithmetic."""

    def __init__(self, n_layers, d_model):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict(
            {p: nn.Linear(d_model, d_model, bias=False) for p in ("q", "k", "v", "o")})
            for _ in range(n_layers))


@pytest.mark.parametrize("n_layers,d_model,r,expected", [
    (96, 12288, 1, 4_718_592),    # GPT-3 175B, LoRA paper Table 4: 4.7M
    (96, 12288, 8, 37_748_736),   # 37.7M
    (12, 768, 8, 294_912),        # RoBERTa-base: 0.3M
])
def test_paper_parameter_counts_on_meta(n_layers, d_model, r, expected):
    with torch.device("meta"):
        model = _Stand_in(n_layers, d_model)
    config = lf.LoraConfig(r=r, target_modules=["q", "v"])
    assert lf.count_lora_parameters(model, config).trainable == expected
    lf.inject_lora(model, config)  # nothing is allocated: every tensor stays on meta
    count = lf.count_parameters(model)
    assert count.trainable == expected and count.total == expected + n_layers * 4 * d_model ** 2
    assert all(p.is_meta for p in model.parameters())
    assert f"{expected:,}" in str(count) and "trainable%" in str(count)


def test_count_matches_peft(llama_dir):
    config = dict(r=4, target_modules="all-linear", rank_pattern={"up_proj": 2})
    ours = lf.inject_lora(hf_model(llama_dir), lf.LoraConfig(**config))
    trainable, total = peft_random(llama_dir, **config).get_nb_trainable_parameters()
    assert (lf.count_parameters(ours).trainable, lf.count_parameters(ours).total) == (trainable, total)
    assert lf.count_lora_parameters(hf_model(llama_dir), lf.LoraConfig(**config)).trainable == trainable
