"""The analyses on real PEFT folders written by peft itself (the oracle for keys and scaling)."""
import pytest
import torch

from lorafleet.analysis import report
from lorafleet.analysis.subspace import amplification_factor, subspace_similarity_grid
from lorafleet.cli import main
from lorafleet.errors import AdapterError


def _peft_adapter(base_dir, out, r, seed, targets=("q_proj", "v_proj"), rslora=False):
    import peft
    import transformers

    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                          init_lora_weights=False, use_rslora=rslora)
    model = peft.get_peft_model(base, cfg)
    model.save_pretrained(out)
    return model


def test_factors_match_peft_delta_weights(llama_dir, tmp_path):
    model = _peft_adapter(llama_dir, tmp_path / "a", r=4, seed=0, rslora=True)
    factors = report.load_lora_factors(tmp_path / "a")
    assert sorted(factors) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1)
                               for p in ("q_proj", "v_proj")]
    for name, f in factors.items():
        layer = model.base_model.model.get_submodule(name)
        expected = layer.get_delta_weight("default").double()
        assert torch.allclose(f.delta(), expected, atol=1e-6)
        assert f.scaling == pytest.approx(layer.scaling["default"])


def test_compare_and_analyze(llama_dir, tmp_path):
    _peft_adapter(llama_dir, tmp_path / "r2", r=2, seed=1)
    _peft_adapter(llama_dir, tmp_path / "r8", r=8, seed=2)
    small, big = report.load_lora_factors(tmp_path / "r2"), report.load_lora_factors(tmp_path / "r8")
    pair = report.compare_adapters(small, big)
    name = "model.layers.1.self_attn.v_proj"
    assert torch.allclose(pair.grids[name],
                          subspace_similarity_grid(small[name].lora_a, big[name].lora_a))
    assert pair.grids[name].shape == (2, 8)
    from lorafleet.models import load_model
    weights = report.base_weights_for(load_model(llama_dir), big)
    rows = report.analyze_adapter(big, weights)
    row = next(r for r in rows if r.module == name)
    dw = big[name].delta()
    assert row.amplification == pytest.approx(amplification_factor(weights[name], dw, 8))
    assert row.singular_values == sorted(row.singular_values, reverse=True)
    assert len(row.singular_values) == 8


def test_disjoint_targets_raise(llama_dir, tmp_path):
    _peft_adapter(llama_dir, tmp_path / "q", r=2, seed=0, targets=("q_proj",))
    _peft_adapter(llama_dir, tmp_path / "k", r=2, seed=0, targets=("k_proj",))
    with pytest.raises(AdapterError, match="share no adapted module"):
        report.compare_adapters(report.load_lora_factors(tmp_path / "q"),
                                report.load_lora_factors(tmp_path / "k"))


def test_cli_writes_pngs(llama_dir, tmp_path, capsys):
    _peft_adapter(llama_dir, tmp_path / "r2", r=2, seed=1)
    _peft_adapter(llama_dir, tmp_path / "r4", r=4, seed=2)
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "r2"), str(tmp_path / "r4"), "--base", str(llama_dir),
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "phi(1,1)" in text and "model.layers.0.self_attn.q_proj" in text
    for png in ("spectra.png", "subspace_similarity.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert (out / "analysis.json").is_file()
