"""`lorafleet train --use-dora` and `--init-lora-weights`: passed through to LoraConfig, and a
PiSSA / OLoRA adapter saved as the equal plain LoRA over the original base (what serve loads)."""
import json

import pytest
import torch

from lorafleet.errors import ConfigError
from lorafleet.models import load_model
from lorafleet.train import TrainConfig, load_trained, train
from lorafleet.train.methods import MethodConfig

from .conftest import get_tokenizer


def _train(tmp_path, model_dir, data, **method):
    cfg = TrainConfig(model=str(model_dir), data=str(data), out=str(tmp_path / "run"),
                      method=MethodConfig("lora", targets="q,v", **method), steps=3, lr=1e-2,
                      batch_size=2, warmup=1)
    return train(cfg, tokenizer=get_tokenizer(model_dir))


def _logits(model, ids):
    with torch.no_grad():
        out = model.eval()(ids)
    return getattr(out, "logits", out)


def test_use_dora_trains_a_dora_adapter_that_peft_reads(tmp_path, train_llama_dir, toy_data):
    result = _train(tmp_path, train_llama_dir, toy_data, use_dora=True)
    names = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names), names
    saved = json.loads((result.artifact / "adapter_config.json").read_text())
    assert saved["use_dora"] is True
    ids = torch.randint(2, 300, (2, 9))
    torch.testing.assert_close(_logits(load_trained(load_model(train_llama_dir), result.artifact),
                                       ids), _logits(result.model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_adapter_is_saved_as_plain_lora_over_the_original_base(
        tmp_path, train_llama_dir, toy_data, init):
    result = _train(tmp_path, train_llama_dir, toy_data, init_lora_weights=init)
    saved = json.loads((result.artifact / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 2 * 8, saved
    # The converted adapter over the untouched base equals the trained model (rewritten base).
    ids = torch.randint(2, 300, (2, 9))
    torch.testing.assert_close(_logits(load_trained(load_model(train_llama_dir), result.artifact),
                                       ids), _logits(result.model, ids), rtol=1e-4, atol=1e-4)


def test_bad_init_lora_weights_is_named():
    with pytest.raises(ConfigError, match="init_lora_weights"):
        MethodConfig("lora", init_lora_weights="corda")
    with pytest.raises(ConfigError, match="init_lora_weights: loftq"):
        MethodConfig("lora", init_lora_weights="loftq")
