"""Adapter arithmetic against PEFT's add_weighted_adapter: every combination type, from folders
(library and CLI) and on a live model; the folders PEFT loads; disable/delete/several active."""
import json
import warnings

import pytest
import torch

import lorafleet as lf
from lorafleet.cli import main
from lorafleet.errors import AdapterError, ConfigError
from lorafleet.lora import LoraConfig, inject_lora, set_adapter
from lorafleet.lora.combine import COMBINATION_TYPES, combine_folders
from lorafleet.lora.ops import add_weighted_adapter, delete_adapter, disable_adapter
from lorafleet.lora.peft_format import load_peft

from .lora_helpers import hf_model, logits, peft_random

TARGETS = ["q_proj", "v_proj"]   # model order == natural name order (DARE's mask order)
WEIGHTS = [0.7, -0.4]


def _two_adapters(base, tmp_path, rank_b=4):
    import peft

    model = peft_random(base, adapter_name="a", seed=0, r=4, lora_alpha=8, target_modules=TARGETS)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("b", peft.LoraConfig(init_lora_weights=False, r=rank_b, lora_alpha=4,
                                               target_modules=["q_proj", "v_proj", "o_proj"]))
    model.save_pretrained(tmp_path / "peft")     # PEFT: peft/a, peft/b
    return model, {"a": tmp_path / "peft" / "a", "b": tmp_path / "peft" / "b"}


def _peft_deltas(model, name):
    out = {}
    for key, module in model.named_modules():
        if hasattr(module, "lora_A") and name in module.lora_A:
            out[key.removeprefix("base_model.model.")] = module.get_delta_weight(name)
    return out


def _our_deltas(path):
    adapter = load_peft(path)
    return {n: (m.B @ m.A) * m.scaling for n, m in adapter.modules.items()}


def _peft_combine(model, kind, **options):
    """PEFT's add_weighted_adapter, recording torch's RNG state when DARE first draws."""
    import peft.utils.merge_utils as mu

    state, original = [], mu.random_pruning

    def spy(*args, **kwargs):
        if not state:
            state.append(torch.get_rng_state())
        return original(*args, **kwargs)

    mu.random_pruning = spy
    try:
        model.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type=kind, **options)
    finally:
        mu.random_pruning = original
    return state[0] if state else None


@pytest.mark.parametrize("kind", COMBINATION_TYPES)
def test_combine_folders_equal_peft(llama_dir, tmp_path, ids, kind):
    same_rank = kind in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
    model, paths = _two_adapters(llama_dir, tmp_path, rank_b=4 if same_rank else 2)
    options = {}
    if kind not in ("linear", "cat", "svd"):
        options["density"] = 0.6
    if kind.endswith("svd"):
        options["svd_rank"] = 3       # below the sum of ranks: a real truncation
    rng = _peft_combine(model, kind, **options)
    if rng is not None:               # DARE: the RNG state PEFT drew its masks from
        torch.set_rng_state(rng)
    # the model's module order (q, v, o within a layer), in which PEFT draws DARE's masks
    order = [n.removeprefix("base_model.model.") for n, _ in model.named_modules()]
    out = combine_folders(paths, WEIGHTS, tmp_path / "mix", kind, module_order=order, **options)
    expected, ours = _peft_deltas(model, "mix"), _our_deltas(out)
    assert sorted(ours) == sorted(expected) and len(ours) == 6
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], atol=1e-5, rtol=1e-4)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == model.peft_config["mix"].r
    assert sorted(config["target_modules"]) == sorted(model.peft_config["mix"].target_modules)

    # PEFT loads the folder and computes what its own combined adapter computes
    import peft
    model.set_adapter("mix")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(hf_model(llama_dir), out).eval()
    torch.testing.assert_close(logits(loaded, ids), logits(model.eval(), ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["cat", "ties", "dare_ties"])
def test_add_weighted_adapter_on_a_model_equals_peft(llama_dir, tmp_path, ids, kind):
    """Live model: same adapters, same seed -> PEFT's combined adapter (DARE's masks too: the new
    adapter is injected first and drawn in the model's module order, as PEFT does)."""
    model, paths = _two_adapters(llama_dir, tmp_path)
    options = {} if kind == "cat" else {"density": 0.5}
    torch.manual_seed(7)
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type=kind, **options)
    ours = lf.load_adapter(hf_model(llama_dir), paths["a"], adapter_name="a")
    lf.load_adapter(ours, paths["b"], adapter_name="b")
    torch.manual_seed(7)
    add_weighted_adapter(ours, ["a", "b"], WEIGHTS, "mix", kind, **options)
    assert ours.base_model.layers[0].self_attn.q_proj.active_adapter == "b"   # unchanged
    set_adapter(ours, "mix")
    model.set_adapter("mix")
    torch.testing.assert_close(logits(ours, ids), logits(model.eval(), ids), atol=1e-5, rtol=0)


def test_cli_combine_writes_a_folder_peft_loads(llama_dir, tmp_path, ids):
    import peft

    model, paths = _two_adapters(llama_dir, tmp_path, rank_b=2)
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "cat_mix", combination_type="cat")
    argv = ["adapters", "combine", str(paths["a"]), str(paths["b"]), "--weights",
            *map(str, WEIGHTS), "--type", "cat", "--out", str(tmp_path / "cli")]
    assert main(argv) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(hf_model(llama_dir), tmp_path / "cli").eval()
    model.set_adapter("cat_mix")
    torch.testing.assert_close(logits(loaded, ids), logits(model.eval(), ids), atol=1e-5, rtol=0)
    assert main(argv[:-2] + ["--out", str(tmp_path / "cli")]) == 1   # not empty: refused
    from lorafleet.cli.adapters import COMBINATION_TYPES as CLI_TYPES
    assert sorted(CLI_TYPES) == sorted(COMBINATION_TYPES)


def test_bad_combinations_name_adapters_and_fields(llama_dir, gpt2_dir, tmp_path):
    _, paths = _two_adapters(llama_dir, tmp_path, rank_b=2)
    with pytest.raises(AdapterError, match=r"same rank r; found \{'a': 4, 'b': 2\}"):
        combine_folders(paths, WEIGHTS, tmp_path / "x1", "linear")
    with pytest.raises(ConfigError, match="combination_type: expected one of"):
        combine_folders(paths, WEIGHTS, tmp_path / "x2", "cat_svd_typo")
    with pytest.raises(ConfigError, match="density: combination_type 'ties'"):
        combine_folders(paths, WEIGHTS, tmp_path / "x3", "ties")
    with pytest.raises(ConfigError, match="one weight per adapter"):
        combine_folders(paths, [1.0], tmp_path / "x4", "cat")
    with pytest.raises(ConfigError, match="weight of adapter 'b'"):
        combine_folders(paths, [1.0, float("nan")], tmp_path / "x5", "cat")
    peft_random(gpt2_dir, r=4, target_modules=["c_attn"]).save_pretrained(tmp_path / "g")
    config_file = tmp_path / "g" / "adapter_config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()),
                                           base_model_name_or_path="gpt2-tiny")))
    a_file = paths["a"] / "adapter_config.json"
    a_file.write_text(json.dumps(dict(json.loads(a_file.read_text()),
                                      base_model_name_or_path="llama-tiny")))
    with pytest.raises(AdapterError, match="different base_model_name_or_path.*gpt2-tiny"):
        combine_folders({"a": paths["a"], "g": tmp_path / "g"}, [1, 1], tmp_path / "x6", "cat")
    dora = peft_random(llama_dir, r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(AdapterError, match="'d'.*use_dora"):
        combine_folders({"a": paths["b"], "d": tmp_path / "dora"}, [1, 1], tmp_path / "x7", "cat")


def test_disable_delete_and_several_active(llama_dir, tmp_path, ids):
    import peft

    oracle, paths = _two_adapters(llama_dir, tmp_path)
    ours = lf.load_adapter(hf_model(llama_dir), paths["a"], adapter_name="a")
    lf.load_adapter(ours, paths["b"], adapter_name="b")
    base = logits(hf_model(llama_dir), ids)
    with disable_adapter(ours):
        torch.testing.assert_close(logits(ours, ids), base, atol=1e-6, rtol=0)
    lf.merge(ours, "b")
    with disable_adapter(ours):      # a merged adapter is unmerged first, as PEFT does
        torch.testing.assert_close(logits(ours, ids), base, atol=1e-5, rtol=0)
    set_adapter(ours, ["a", "b"])
    oracle.base_model.set_adapter(["a", "b"])
    torch.testing.assert_close(logits(ours, ids), logits(oracle.eval(), ids), atol=1e-5, rtol=0)
    delete_adapter(ours, "b")
    assert lf.adapter_names(ours) == ["a"]
    torch.testing.assert_close(logits(ours, ids), logits(peft.PeftModel.from_pretrained(
        hf_model(llama_dir), paths["a"]).eval(), ids), atol=1e-5, rtol=0)
    with pytest.raises(AdapterError, match="'b'"):
        delete_adapter(ours, "b")
    inject_lora(ours, LoraConfig(r=2, target_modules=["q_proj"]), "c")   # still usable


def test_merge_cli_several_adapters_with_weights_equals_peft(llama_dir, tmp_path, ids):
    """lorafleet merge --adapter a --adapter b --weights: W0 + sum w_i s_i B_i A_i, which is
    PEFT's exact `cat` combination merged and unloaded."""
    model, paths = _two_adapters(llama_dir, tmp_path, rank_b=2)
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "cat_mix", combination_type="cat")
    model.set_adapter("cat_mix")
    expected = logits(model.merge_and_unload().eval(), ids)
    assert main(["merge", "--model", str(llama_dir), "--adapter", str(paths["a"]), "--adapter",
                 str(paths["b"]), "--weights", *map(str, WEIGHTS), "--out",
                 str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(logits(hf_model(tmp_path / "merged"), ids), expected,
                               atol=1e-5, rtol=0)
    assert main(["merge", "--model", str(llama_dir), "--adapter", str(paths["a"]), "--adapter",
                 str(paths["b"]), "--weights", "1", "--out", str(tmp_path / "m2")]) == 1
