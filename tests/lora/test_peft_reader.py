"""The one PEFT reader (`load_peft`): injection, merging and the serving engine agree with peft on
every module's rank, alpha and scaling (rank_pattern, alpha_pattern, rsLoRA); the header-only
mode reads no tensor data; bad tensors are refused naming the key."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorafleet as lf
from lorafleet.lora.inject import lora_layers
from lorafleet.errors import AdapterError, ShapeError
from lorafleet.lora.merge import merge_checkpoint
from lorafleet.lora.peft_format import load_peft, read_adapter

from .lora_helpers import hf_model, peft_random

# q: rank 4 via r; v: rank 2 via rank_pattern; layer 0's v also a pattern alpha; rsLoRA on.
CONFIG = dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
              rank_pattern={"v_proj": 2, "down_proj": 3},
              alpha_pattern={r"layers\.0\.self_attn\.v_proj": 3, "down_proj": 5})


@pytest.fixture
def adapter_dir(llama_dir, tmp_path):
    oracle = peft_random(llama_dir, **CONFIG)
    oracle.save_pretrained(tmp_path / "a")
    return tmp_path / "a", oracle


def _peft_scalings(oracle):
    """{module name in the base model: scaling} as peft computed it."""
    out = {}
    for name, module in oracle.named_modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict) and module.scaling:
            out[name.removeprefix("base_model.model.")] = module.scaling["default"]
    return out


def test_inject_merge_serve_agree_with_peft_on_scaling(llama_dir, adapter_dir, tmp_path):
    from lorafleet.serve.engine import Engine, EngineConfig

    path, oracle = adapter_dir
    expected = _peft_scalings(oracle)
    assert len(set(expected.values())) >= 3        # the patterns and rsLoRA change something
    parsed = load_peft(path)
    assert {m: lora.scaling for m, lora in parsed.modules.items()} == pytest.approx(expected)
    # inject (load_adapter injects from the folder's config)
    model = lf.load_adapter(hf_model(llama_dir), path)
    injected = {name: layer.scaling["default"] for name, layer in lora_layers(model)}
    assert injected == pytest.approx(expected)
    # serve: the engine's registered layout, from the header alone
    engine = Engine(llama_dir, config=EngineConfig(num_pages=512, dtype="float32"))
    engine.register_adapter("a", path, lazy=True)
    served = {m: s.scaling for m, s in engine.cache.specs["a"].modules.items()}
    assert served == pytest.approx(expected)
    # merge: the merged checkpoint equals peft's merge_and_unload (scaling * B A per module)
    merge_checkpoint(llama_dir, path, tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    reference = oracle.merge_and_unload().state_dict()
    for key in merged:
        torch.testing.assert_close(merged[key], reference[key], atol=1e-6, rtol=0)


def test_header_only_reads_no_tensors(adapter_dir):
    path, _ = adapter_dir
    header, full = load_peft(path, header_only=True), load_peft(path)
    assert not header.has_data and full.has_data
    assert all(m.A is None and m.B is None for m in header.modules.values())
    for name, module in full.modules.items():
        head = header.modules[name]
        assert (head.rank, head.alpha, head.scaling, head.a_shape, head.b_shape) == (
            module.rank, module.alpha, module.scaling, tuple(module.A.shape),
            tuple(module.B.shape))


def _rewrite(path, change):
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file)


KEY = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_weights_refused_at_load_and_merge(llama_dir, adapter_dir, tmp_path, bad):
    path, _ = adapter_dir
    _rewrite(path, lambda t: t[KEY].view(-1).__setitem__(3, float(bad)))
    for load in (lambda: load_peft(path), lambda: read_adapter(path),
                 lambda: lf.load_adapter(hf_model(llama_dir), path),
                 lambda: merge_checkpoint(llama_dir, path, tmp_path / "out")):
        with pytest.raises(AdapterError, match=rf"{KEY}.*NaN or Inf"):
            load()
    load_peft(path, header_only=True)               # the header alone cannot tell


def test_merge_of_a_live_model_refuses_non_finite(llama_dir):
    model = lf.inject_lora(hf_model(llama_dir), lf.LoraConfig(target_modules=["q_proj"]))
    layer = dict(lora_layers(model))["model.layers.0.self_attn.q_proj"]
    before = layer.base_layer.weight.clone()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(AdapterError, match="layers.0.self_attn.q_proj.*NaN or Inf"):
        lf.merge(model, "default")
    assert torch.equal(layer.base_layer.weight, before)     # nothing merged


def test_integer_tensors_refused_not_cast(adapter_dir):
    path, _ = adapter_dir
    _rewrite(path, lambda t: t.__setitem__(KEY, torch.ones_like(t[KEY], dtype=torch.int32)))
    for header_only in (True, False):
        with pytest.raises(AdapterError, match=rf"{KEY}.*dtype (I32|int32)"):
            load_peft(path, header_only=header_only)


def test_tensor_rank_must_match_config(adapter_dir):
    path, _ = adapter_dir
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps(dict(config, r=8)))
    with pytest.raises(ShapeError, match=r"q_proj.*expected rank 8 from the config.*\[4, 64\]"):
        load_peft(path, header_only=True)


def test_rank_zero_refused(adapter_dir):
    path, _ = adapter_dir
    prefix = "base_model.model.model.layers.1.self_attn.q_proj"

    def empty(tensors):
        tensors[f"{prefix}.lora_A.weight"] = torch.zeros(0, 64)
        tensors[f"{prefix}.lora_B.weight"] = torch.zeros(64, 0)

    _rewrite(path, empty)
    with pytest.raises(ShapeError, match="rank 0"):
        load_peft(path)
