"""Bad checkpoint folders give errors that name the file, key or architecture."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafleet.errors import ConfigError, ModelLoadError
from lorafleet.models import ModelConfig, load_model


@pytest.fixture
def llama_copy(tmp_path, llama_dir):
    path = tmp_path / "ckpt"
    shutil.copytree(llama_dir, path)
    return path


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_folder_config_and_weights(tmp_path, llama_copy):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path / "empty")
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(llama_copy)
    (llama_copy / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(llama_copy)


def test_unsupported_architecture_names_supported(llama_copy):
    edit_config(llama_copy, architectures=["FalconForCausalLM"], model_type="falcon")
    with pytest.raises(ModelLoadError, match="FalconForCausalLM.*LlamaForCausalLM.*GPT2LMHeadModel"):
        load_model(llama_copy)


def test_bad_config_values(llama_copy):
    edit_config(llama_copy, num_attention_heads=3)
    with pytest.raises(ConfigError, match="num_attention_heads"):
        load_model(llama_copy)
    edit_config(llama_copy, num_attention_heads=4, rope_parameters={"rope_type": "yarn",
                                                                    "factor": 2.0})
    with pytest.raises(ConfigError, match="yarn"):
        load_model(llama_copy)
    edit_config(llama_copy, rope_parameters=None, hidden_size=None)
    with pytest.raises(ConfigError, match="hidden_size"):
        load_model(llama_copy)


def test_wrong_shape_names_key_expected_and_found(llama_copy):
    tensors = load_file(llama_copy / "model.safetensors")
    key = "model.layers.1.self_attn.k_proj.weight"
    tensors[key] = torch.zeros(64, 64)
    save_file(tensors, llama_copy / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"k_proj.*\[64, 64\].*expected \[32, 64\]"):
        load_model(llama_copy)


def test_missing_and_unexpected_keys(llama_copy):
    tensors = load_file(llama_copy / "model.safetensors")
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, llama_copy / "model.safetensors")
    with pytest.raises(ModelLoadError, match="unexpected tensor 'model.layers.0.extra.weight'"):
        load_model(llama_copy)
    del tensors["model.layers.0.extra.weight"], tensors["model.norm.weight"]
    save_file(tensors, llama_copy / "model.safetensors")
    with pytest.raises(ModelLoadError, match="lacks 1 tensor.*model.norm.weight"):
        load_model(llama_copy)


def test_shard_index_naming_missing_file(checkpoints, tmp_path):
    path, _ = checkpoints("llama_sharded")
    copy = tmp_path / "sharded"
    shutil.copytree(path, copy)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (copy / shard).unlink()
    with pytest.raises(ModelLoadError, match=f"names shard '{shard}', which is missing"):
        load_model(copy)


def test_dtype_and_config_fields(llama_dir):
    model = load_model(llama_dir, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert isinstance(model.config, ModelConfig) and not model.training
    with pytest.raises(ConfigError, match="dtype"):
        load_model(llama_dir, dtype="int3")
