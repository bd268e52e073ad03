"""`lorafleet merge` (name-level arithmetic on checkpoint folders) against PEFT's merge_and_unload,
and `lorafleet adapters inspect`."""
import json

import pytest
import torch
from hf_fixtures import make_checkpoint
from .lora_helpers import hf_model, logits, peft_random
from safetensors.torch import load_file

from lorafleet.cli import main
from lorafleet.errors import AdapterError, ShapeError
from lorafleet.lora.merge import merge_checkpoint


def _checkpoint(folder):
    tensors = {}
    for file in folder.glob("*.safetensors"):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_sharded")
    make_checkpoint(path, "llama", max_shard_size="200KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def _check_against_peft(base_dir, tmp_path, ids, dtype=None, **config):
    oracle = peft_random(base_dir, **config)
    oracle.save_pretrained(tmp_path / "adapter")
    expected_logits = logits(oracle, ids)
    expected = oracle.merge_and_unload().state_dict()
    args = ["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"),
            "--out", str(tmp_path / "merged")] + (["--dtype", dtype] if dtype else [])
    assert main(args) == 0
    merged = _checkpoint(tmp_path / "merged")
    assert set(merged) <= set(expected) and merged
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor.float(), expected[key].float(),
                                   atol=1e-6 if dtype is None else 1e-2, rtol=0 if dtype is None else 1e-2)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "merged" / name).is_file()
    return merged, expected_logits


def test_llama_sharded_merge_equals_peft(sharded_llama, tmp_path, ids):
    _, expected_logits = _check_against_peft(
        sharded_llama, tmp_path, ids, r=4, lora_alpha=16, use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={"down_proj": 2}, alpha_pattern={r"layers\.0\.self_attn\.v_proj": 3})
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(logits(hf_model(tmp_path / "merged"), ids), expected_logits,
                               atol=1e-5, rtol=0)


def test_gpt2_conv1d_merge_equals_peft(gpt2_dir, tmp_path, ids):
    merged, _ = _check_against_peft(gpt2_dir, tmp_path, ids, r=4, lora_alpha=8,
                                    target_modules=["c_attn", "c_proj", "c_fc"])
    assert "transformer.h.0.attn.c_proj.weight" in merged  # square: layout from fan_in_fan_out


def test_dtype_option(gpt2_dir, tmp_path, ids):
    merged, _ = _check_against_peft(gpt2_dir, tmp_path, ids, dtype="bfloat16", r=2,
                                    target_modules=["c_attn"])
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_merge_checkpoint_bad_inputs(llama_dir, gpt2_dir, tmp_path):
    peft_random(gpt2_dir, r=2, target_modules=["c_attn"]).save_pretrained(tmp_path / "gpt2_adapter")
    with pytest.raises(AdapterError, match="no tensor"):
        merge_checkpoint(llama_dir, tmp_path / "gpt2_adapter", tmp_path / "out1")
    peft_random(llama_dir, r=2, target_modules=["q_proj"]).save_pretrained(tmp_path / "llama_adapter")
    small = tmp_path / "small"
    make_checkpoint(small, "llama", tokenizer=False, hidden_size=32, intermediate_size=64)
    with pytest.raises(ShapeError, match="q_proj"):
        merge_checkpoint(small, tmp_path / "llama_adapter", tmp_path / "out2")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(AdapterError, match="not empty"):
        merge_checkpoint(llama_dir, tmp_path / "llama_adapter", tmp_path / "full")
    assert main(["merge", "--model", str(llama_dir), "--adapter", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "out3")]) == 1


def test_adapters_inspect(llama_dir, tmp_path, capsys):
    peft_random(llama_dir, r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                rank_pattern={"v_proj": 2}).save_pretrained(tmp_path / "a")
    assert main(["adapters", "inspect", str(tmp_path / "a"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    # q: 4 * (64 + 64), v: 2 * (64 + 32) per layer, 2 layers (GQA: v_proj out = 32)
    assert info["parameters"] == 2 * (4 * 128 + 2 * 96)
    assert info["r"] == 4 and info["lora_alpha"] == 16 and info["ranks"] == [2, 4]
    assert info["module_types"] == ["q_proj", "v_proj"] and info["adapted_modules"] == 4
    assert info["size_bytes"] > info["parameters"] * 4
    assert main(["adapters", "inspect", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    assert "1,408" in text and "q_proj" in text and "size on disk" in text


def test_checkpoint_without_transformer_prefix(gpt2_dir, tmp_path, ids):
    """Original GPT-2 checkpoints name tensors `h.0.attn.c_attn.weight` (no `transformer.`)."""
    import shutil

    from safetensors.torch import save_file

    base = tmp_path / "bare"
    shutil.copytree(gpt2_dir, base)
    tensors = load_file(base / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()},
              base / "model.safetensors", metadata={"format": "pt"})
    oracle = peft_random(gpt2_dir, r=2, lora_alpha=4, target_modules=["c_attn", "wte"])
    oracle.save_pretrained(tmp_path / "adapter")
    expected = oracle.merge_and_unload().state_dict()
    report = merge_checkpoint(base, tmp_path / "adapter", tmp_path / "merged")
    assert sorted(report.merged) == ["h.0.attn.c_attn.weight", "h.1.attn.c_attn.weight", "wte.weight"]
    for key, tensor in _checkpoint(tmp_path / "merged").items():
        torch.testing.assert_close(tensor, expected["transformer." + key if "lm_head" not in key else key],
                                   atol=1e-6, rtol=0)
