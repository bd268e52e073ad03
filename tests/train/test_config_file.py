"""`lorafleet train --config`: a YAML / TOML file (our names or TRL / Axolotl ones) and the run's
own train_config.json give exactly the run the same flags give; what train writes, serve serves."""
import json

import pytest
from safetensors.torch import load_file

from lorafleet.cli import main
from lorafleet.errors import ConfigError, TargetError
from lorafleet.train import TrainConfig, train

FLAGS = ["--method", "lora", "--r", "4", "--alpha", "8", "--targets", "q,v,o", "--lr", "3e-3",
         "--steps", "3", "--batch-size", "2", "--grad-accum", "2", "--warmup-ratio", "0.34",
         "--keep-checkpoints", "1", "--save-every", "1", "--min-lr-ratio", "0.0",
         "--use-rslora", "--no-progress"]

TRL_YAML = """\
model_name_or_path: {model}
learning_rate: 3.0e-3
max_steps: 3
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
warmup_ratio: 0.34
save_total_limit: 1
save_steps: 1
cosine_min_lr_ratio: 0.0
lora_r: 4
lora_alpha: 8
lora_target_modules: [q, v, o]
use_rslora: true
"""


def adapter_tensors(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same_run(a, b):
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys() and ta
    for key in ta:
        assert (ta[key] == tb[key]).all(), key   # same seed, same data, same settings: bitwise
    cfg_a = json.loads((a / "train_config.json").read_text())
    cfg_b = json.loads((b / "train_config.json").read_text())
    assert {**cfg_a, "out": None} == {**cfg_b, "out": None}


def test_config_file_with_trl_spellings_equals_the_same_run_from_flags(tmp_path, llama_dir,
                                                                       toy_data):
    by_flags, by_file, again = tmp_path / "flags", tmp_path / "file", tmp_path / "again"
    assert main(["train", "--model", str(llama_dir), "--data", str(toy_data),
                 "--out", str(by_flags), *FLAGS]) == 0
    config = tmp_path / "run.yaml"
    config.write_text(TRL_YAML.format(model=llama_dir))
    # the file gives everything but the data and out; a flag overrides the file's lr
    assert main(["train", "--config", str(config), "--data", str(toy_data), "--out",
                 str(by_file), "--no-progress", "--learning-rate", "3e-3"]) == 0
    assert_same_run(by_flags, by_file)
    saved = json.loads((by_flags / "train_config.json").read_text())
    assert saved["method"]["use_rslora"] and saved["keep_checkpoints"] == 1
    assert json.loads((by_flags / "adapter" / "adapter_config.json").read_text())["use_rslora"]
    # the run's own train_config.json is a config: the same run again
    assert main(["train", "--config", str(by_flags / "train_config.json"), "--out", str(again),
                 "--no-progress"]) == 0
    assert_same_run(by_flags, again)
    # save_total_limit=1: one checkpoint, holding a PEFT adapter folder
    steps = sorted((by_flags / "checkpoints").glob("step-*"))
    assert [p.name for p in steps] == ["step-00000003"]
    assert (steps[0] / "adapter" / "adapter_config.json").is_file()


def test_toml_config_and_overrides(tmp_path, llama_dir, toy_data):
    from lorafleet.cli import build_parser
    from lorafleet.cli.config_file import apply_config_file
    from lorafleet.cli.train import config_from_args
    config = tmp_path / "run.toml"
    config.write_text(f'base_model = "{llama_dir}"\nnum_train_epochs = 2.0\nlora_r = 16\n'
                      'completion_only_loss = false\noptim = "adamw_torch"\n'
                      'lr_scheduler_type = "linear"\npacking = true\n')
    argv = ["train", "--config", str(config), "--data", str(toy_data), "--out", "o",
            "--lora-r", "32", "--no-pack"]
    parser = build_parser()
    apply_config_file(parser, argv)
    cfg = config_from_args(parser.parse_args(argv))
    assert cfg.model == str(llama_dir) and cfg.epochs == 2.0 and cfg.method.r == 32
    assert cfg.train_on_prompt and cfg.optim == "adamw" and cfg.schedule == "linear"
    assert not cfg.pack                                  # the command line turned it off
    assert not cfg.data_config().mask_prompt


@pytest.mark.parametrize("values, message", [
    ({"lerning_rate": 1e-3}, "did you mean learning_rate"),
    ({"lr": 1e-3, "learning_rate": 2e-3}, "both set lr"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"warmup": 3, "warmup_ratio": 0.1}, "warmup_ratio"),
])
def test_bad_settings_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_flat(model="m", data="d", out="o", **values)


def test_unknown_key_in_config_file_is_named(tmp_path, llama_dir, toy_data, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("per_device_batch: 2\n")
    with pytest.raises(SystemExit):
        main(["train", "--config", str(config), "--model", str(llama_dir), "--data",
              str(toy_data), "--out", str(tmp_path / "o")])
    assert "per_device_batch" in capsys.readouterr().err


def test_lm_head_target_is_refused_unless_merge_only(tmp_path, llama_dir, toy_data):
    cfg = dict(model=str(llama_dir), data=str(toy_data), steps=1, targets="q,lm_head")
    with pytest.raises(TargetError, match="does not apply LoRA to the output head"):
        train(TrainConfig.from_flat(out=str(tmp_path / "a"), **cfg))
    result = train(TrainConfig.from_flat(out=str(tmp_path / "b"), merge_only=True, **cfg))
    assert "lm_head" in json.loads((result.artifact / "adapter_config.json").read_text()
                                   )["target_modules"]


def test_serving_on_another_base_warns(tmp_path, llama_dir, toy_data, caplog):
    import logging
    import shutil

    from lorafleet.serve import Engine, EngineConfig
    result = train(TrainConfig.from_flat(model=str(llama_dir), data=str(toy_data), steps=1,
                                         out=str(tmp_path / "run")))
    saved = json.loads((result.artifact / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(llama_dir.resolve())
    other = shutil.copytree(llama_dir, tmp_path / "other-base")
    for base, warns in ((llama_dir, False), (other, True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lorafleet.serve"):
            engine = Engine(str(base), config=EngineConfig(num_pages=512, block_tokens=4))
            engine.register_adapter(f"a-{warns}", str(result.artifact))
        assert ("trained on" in caplog.text) == warns, caplog.text
