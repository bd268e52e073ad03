"""PiSSA / OLoRA initializations against PEFT (same A, B and residual base), their conversion to a
plain LoRA over the original base (PEFT's path_initial_model_for_weight_conversion), and
load_adapter's is_trainable."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import lorafleet as lf
from lorafleet.errors import AdapterError, ConfigError
from lorafleet.lora import LoraConfig, disable_adapter, inject_lora
from lorafleet.lora.peft_model import save_adapter

from .lora_helpers import hf_model, logits

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def _peft(base, seed, **config):
    import peft

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(hf_model(base), peft.LoraConfig(**config)).eval()


def _ours(base, seed, **config):
    torch.manual_seed(seed)
    return inject_lora(hf_model(base), LoraConfig(**config)).eval()


def _same_state(ours, oracle):
    """Every adapter tensor and every (residual) base weight equal."""
    theirs = {k.removeprefix("base_model.model."): v for k, v in oracle.state_dict().items()}
    mine = ours.state_dict()
    assert sorted(mine) == sorted(theirs)
    for key, value in mine.items():
        torch.testing.assert_close(value, theirs[key], atol=2e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_init_equals_peft(llama_dir, gpt2_dir, ids, kind, init):
    if kind == "gpt2" and init == "olora":
        pytest.skip("PEFT's olora_init does not transpose a Conv1D weight (its QR is of [in, out])")
    base = {"llama": llama_dir, "gpt2": gpt2_dir}[kind]
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS[kind], init_lora_weights=init)
    oracle, ours = _peft(base, 5, **config), _ours(base, 5, **config)
    _same_state(ours, oracle)
    original = logits(hf_model(base), ids)
    # at step 0 the residual base + B A is the original model
    torch.testing.assert_close(logits(ours, ids), original, atol=1e-4, rtol=0)
    with disable_adapter(ours):   # the residual base alone differs
        assert not torch.allclose(logits(ours, ids), original, atol=1e-3)


def _train_like(models, seed=9):
    """The same random move of every A and B in each model (a stand-in for training)."""
    for model in models:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in sorted(model.named_parameters()):
                if "lora_" in name:
                    param.add_(0.05 * torch.randn(param.shape, generator=g))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_adapter_equals_peft_and_serves_over_the_original_base(llama_dir, tmp_path,
                                                                          ids, init):
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights=init,
                  use_rslora=init == "olora")
    oracle, ours = _peft(llama_dir, 2, **config), _ours(llama_dir, 2, **config)
    oracle.save_pretrained(tmp_path / "initial")          # PEFT's step before training
    _train_like([oracle, ours])
    trained = logits(oracle, ids)
    torch.testing.assert_close(logits(ours, ids), trained, atol=1e-4, rtol=0)
    oracle.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(
        tmp_path / "initial"))
    save_adapter(ours, tmp_path / "ours", convert_to_lora=True)
    save_adapter(ours, tmp_path / "ours2", path_initial_model_for_weight_conversion=tmp_path / "initial")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    for folder in ("ours", "ours2"):
        mine = load_file(tmp_path / folder / "adapter_model.safetensors")
        assert sorted(mine) == sorted(theirs)
        for key in theirs:
            torch.testing.assert_close(mine[key], theirs[key], atol=1e-5, rtol=1e-4)
        saved = json.loads((tmp_path / folder / "adapter_config.json").read_text())
        peft_saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        for field in ("r", "lora_alpha", "init_lora_weights", "use_rslora"):
            assert saved[field] == pytest.approx(peft_saved[field]), field
    # over the unchanged base, the plain rank-2r LoRA is the trained model
    plain = lf.load_adapter(hf_model(llama_dir), tmp_path / "ours")
    torch.testing.assert_close(logits(plain, ids), trained, atol=1e-4, rtol=0)

    # the engine's registry takes the converted folder and refuses the unconverted one
    from lorafleet.serve.adapter_registry import BaseLayout, read_spec
    layout = BaseLayout({n: (m.in_features, m.out_features)
                         for n, m in hf_model(llama_dir).named_modules()
                         if n.endswith(tuple(TARGETS["llama"]))}, 64, 16)
    assert read_spec("converted", tmp_path / "ours", layout).name == "converted"
    save_adapter(ours, tmp_path / "raw")
    with pytest.raises(AdapterError, match=f"'raw'.*init_lora_weights='{init}'"):
        read_spec("raw", tmp_path / "raw", layout)


def test_init_errors(llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="init_lora_weights"):
        LoraConfig(init_lora_weights="pissa_niter_x")
    with pytest.raises(ConfigError, match="loftq"):
        _ours(llama_dir, 0, r=2, target_modules=["q_proj"], init_lora_weights="loftq")
    model = _ours(llama_dir, 0, r=2, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match="did not change the base"):
        save_adapter(model, tmp_path / "x", convert_to_lora=True)


def test_load_adapter_is_frozen_unless_trainable(llama_dir, tmp_path):
    model = _ours(llama_dir, 0, r=2, target_modules=["q_proj"], init_lora_weights=False)
    save_adapter(model, tmp_path / "a")
    frozen = lf.load_adapter(hf_model(llama_dir), tmp_path / "a")
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = lf.load_adapter(hf_model(llama_dir), tmp_path / "a", is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n for n in names)
