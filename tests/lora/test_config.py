"""LoraConfig: PEFT names and defaults, validation naming the field, the JSON both ways."""
import json

import pytest

from lorafleet.errors import AdapterError, ConfigError
from lorafleet.lora.config import LoraConfig


def test_defaults_match_peft():
    import peft

    ours, theirs = LoraConfig(), peft.LoraConfig()
    for name in ("r", "lora_alpha", "lora_dropout", "use_rslora", "fan_in_fan_out", "bias",
                 "init_lora_weights", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        assert getattr(ours, name) == getattr(theirs, name), name


@pytest.mark.parametrize("field,value", [
    ("r", 0), ("r", 2.5), ("lora_alpha", -1), ("lora_alpha", float("nan")), ("lora_dropout", 1.0),
    ("target_modules", 5), ("target_modules", []), ("exclude_modules", [1]),
    ("layers_to_transform", [-1]), ("layers_to_transform", "0"), ("layers_pattern", 3),
    ("rank_pattern", {"q_proj": 0}), ("alpha_pattern", ["x"]), ("use_rslora", "yes"),
    ("bias", "some"), ("init_lora_weights", "corda"), ("init_lora_weights", "pissa_niter_0"), ("modules_to_save", "lm_head"),
])
def test_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        LoraConfig(**{field: value})


def test_scaling():
    assert LoraConfig().scaling(4, 16) == 4
    assert LoraConfig(use_rslora=True).scaling(4, 16) == 8


def test_peft_json_both_ways(tmp_path):
    import peft

    ours = LoraConfig(r=4, lora_alpha=32, target_modules=["v_proj", "q_proj"], use_rslora=True,
                      rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 8}, bias="lora_only",
                      layers_to_transform=[0, 1], modules_to_save=["lm_head"])
    (tmp_path / "adapter_config.json").write_text(json.dumps(ours.to_peft_dict()))
    theirs = peft.LoraConfig.from_pretrained(tmp_path)
    for name in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "bias",
                 "layers_to_transform", "modules_to_save"):
        assert getattr(theirs, name) == getattr(ours, name), name
    assert set(theirs.target_modules) == {"q_proj", "v_proj"}
    theirs.save_pretrained(tmp_path / "peft")
    assert LoraConfig.from_peft(tmp_path / "peft") == LoraConfig.from_peft(tmp_path)


def test_from_peft_errors(tmp_path):
    with pytest.raises(AdapterError, match="adapter_config.json"):
        LoraConfig.from_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{\n  \"r\": 4,\n")
    with pytest.raises(ConfigError, match="line"):
        LoraConfig.from_peft(tmp_path)
    with pytest.raises(ConfigError, match="peft_type"):
        LoraConfig.from_dict({"peft_type": "IA3"})
    with pytest.raises(ConfigError, match="r: expected"):
        LoraConfig.from_dict({"peft_type": "LORA", "r": -2})
    with pytest.warns(UserWarning, match="future_key"):
        assert LoraConfig.from_dict({"peft_type": "LORA", "r": 2, "future_key": 1}).r == 2
