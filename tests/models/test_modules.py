"""models/modules.py, the one answer to "which modules are projections": against PEFT's own
"all-linear" resolution and transformers' Conv1D, on our models, transformers' models, and a
4-bit base (which models/ cannot import)."""
import warnings

import pytest
import torch
from torch import nn

from lorafleet.models import load_model
from lorafleet.models.gpt2 import Conv1D
from lorafleet.models.modules import (is_conv1d, is_projection, linear_features,
                                      linear_layer_names, modules_ending_with, name_matches,
                                      output_head_names, replace_submodule)
from lorafleet.quant import Linear4bit, quantize_model


def peft_all_linear(model: nn.Module) -> set[str]:
    """The full names of the modules PEFT adapts for target_modules="all-linear"."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, peft.LoraConfig(target_modules="all-linear"))
    prefix, suffix = "base_model.model.", ".lora_A"
    return {n[len(prefix):-len(suffix)] for n, _ in wrapped.named_modules() if n.endswith(suffix)}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_all_linear_is_peft_all_linear(kind, llama_dir, gpt2_dir):
    from transformers import AutoModelForCausalLM

    path = {"llama": llama_dir, "gpt2": gpt2_dir}[kind]
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    expected = peft_all_linear(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    assert expected     # transformers' model and ours: the modules PEFT adapts
    for model in (theirs, load_model(path)):
        names = linear_layer_names(model)
        assert set(names) == expected
        assert "lm_head" in output_head_names(model) and "lm_head" not in names
        assert linear_layer_names(model, include_lm_head=True) == names + ["lm_head"]
    assert linear_layer_names(theirs) == linear_layer_names(load_model(path))


def test_conv1d_ours_and_transformers():
    from transformers.pytorch_utils import Conv1D as HFConv1D

    for conv in (Conv1D(6, 10), HFConv1D(10, 6)):       # both: in 6, out 10, weight [6, 10]
        assert is_conv1d(conv) and is_projection(conv)
        assert linear_features(conv) == (6, 10)
    linear = nn.Linear(6, 10)
    assert not is_conv1d(linear) and is_projection(linear) and linear_features(linear) == (6, 10)
    assert not is_projection(nn.Embedding(4, 4)) and linear_features(nn.LayerNorm(4)) is None


def test_a_4bit_base_is_recognised_without_models_importing_quant(llama_dir):
    model = quantize_model(load_model(llama_dir))
    names = linear_layer_names(model)
    assert names and all(isinstance(model.get_submodule(n), Linear4bit) for n in names)
    assert names == linear_layer_names(load_model(llama_dir))
    layer = model.get_submodule(names[0])
    assert not is_conv1d(layer)     # decided without touching `weight` (it dequantizes)
    assert linear_features(layer) == (layer.in_features, layer.out_features)


def test_name_matching_and_replacing():
    model = nn.Sequential(nn.ModuleDict({"q_proj": nn.Linear(2, 2), "xq_proj": nn.Linear(2, 2)}))
    assert modules_ending_with(model, ["q_proj"]) == ["0.q_proj"]
    assert name_matches("0.q_proj", ["0.q_proj"]) and not name_matches("0.xq_proj", ["q_proj"])
    new = nn.Identity()
    replace_submodule(model, "0.q_proj", new)
    assert model[0]["q_proj"] is new
    replace_submodule(model, "0", new)
    assert model[0] is new
