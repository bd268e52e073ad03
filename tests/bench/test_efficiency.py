"""bench efficiency: the latency variants compute what they claim (merged LoRA = the LoRA model
with the base's modules; adapters and the unmerged low-rank path move the output), the GPT-3
arithmetic against the paper's figures, the training numbers against bench train's own ratio,
and a tiny run end to end (JSON, figure, doc block, --from-json re-render)."""
import argparse
import copy
import json
from pathlib import Path

import pytest
import torch

from lorafleet.bench import efficiency
from lorafleet.errors import ConfigError
from lorafleet.lora import LoraLayer, lora_layers, unload

TINY = ["--layers", "2", "--hidden", "64", "--heads", "4", "--intermediate", "128",
        "--vocab", "97", "--bottlenecks", "4,32", "--dtype", "float32", "--roofline-n", "256"]


def _args(argv):
    parser = argparse.ArgumentParser()
    efficiency.add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = argv
    return args


@pytest.fixture(scope="module")
def variants():
    config = efficiency.gpt2_shape_config(layers=2, hidden=64, heads=4, intermediate=128,
                                          vocab=97, context=32)
    return config, efficiency.build_variants(config, [4, 32], r=4, targets="q,v",
                                             dtype=torch.float32)


def _ids(vocab):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def test_merged_lora_is_the_lora_model_with_the_bases_modules(variants):
    config, models = variants
    ids = _ids(config.vocab_size)
    base, merged, unmerged = models["base"], models["lora_merged"], models["lora_unmerged"]
    torch.testing.assert_close(merged(ids), unmerged(ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged(ids), base(ids), atol=1e-4)  # B != 0: a real update
    # the same modules and shapes as the base: the same cost per forward
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert [(n, p.shape) for n, p in merged.named_parameters()] == \
        [(n, p.shape) for n, p in base.named_parameters()]
    # with B = 0 (LoRA at step 0) the merged model is the base exactly
    zero = copy.deepcopy(unmerged)
    for _, layer in lora_layers(zero):
        layer.lora_B["default"].weight.zero_()
    assert torch.equal(unload(zero, "default")(ids), base(ids))


@torch.no_grad()
@pytest.mark.parametrize("name, per_layer", [("adapter_h4", 2), ("adapter_l4", 1),
                                             ("adapter_h32", 2), ("adapter_l32", 1)])
def test_adapter_layers_are_exercised_in_the_latency_run(variants, name, per_layer):
    config, models = variants
    ids = _ids(config.vocab_size)
    model = models[name]
    adapters = efficiency.adapter_modules(model)
    assert len(adapters) == per_layer * config.num_hidden_layers  # Houlsby: 2 per layer; Lin: 1
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in adapters]
    try:
        out = model(ids)
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == len(adapters)
    assert not torch.allclose(out, models["base"](ids), atol=1e-4)
    # the same model with the up-projections at zero (as initialized) is the base exactly
    zero = copy.deepcopy(model)
    for m in efficiency.adapter_modules(zero):
        m.up.weight.zero_()
        m.up.bias.zero_()
    assert torch.equal(zero(ids), models["base"](ids))
    width = int(name[len("adapter_x"):])
    assert all(m.down.out_features == width for m in adapters)


def test_gpt3_arithmetic_matches_the_papers_figures():
    g = efficiency.gpt3_arithmetic()
    # DESIGN.md's facts from the paper: r=1 on Wq, Wv is the paper's 4.7M; r=8 its 37.7M
    assert g["lora_qv_params"]["1"] == 4_718_592
    assert g["lora_qv_params"]["8"] == 37_748_736
    assert g["gpt2_medium_lora_qv_r4"] == 393_216
    assert g["params"] == pytest.approx(175e9, rel=0.01)
    assert g["checkpoint_bytes_fp16"] == pytest.approx(350e9, rel=0.01)   # 350 GB
    assert g["lora_qv_bytes_fp16"]["4"] == pytest.approx(35e6, rel=0.1)   # 35 MB
    assert 9_000 < g["size_ratio_r4"] < 11_000                            # "10,000x"


def test_training_numbers_come_from_bench_train():
    path = Path(__file__).parents[2] / efficiency.TRAIN_RESULTS
    data = json.loads(path.read_text())
    t = efficiency.training_reference(path)
    assert t["lora_memory_mib"] / t["full_memory_mib"] == \
        pytest.approx(data["ratios"]["lora_over_full_memory"])
    assert t["lora_step_s"] / t["full_step_s"] == \
        pytest.approx(data["ratios"]["lora_over_full_step_time"])
    assert efficiency.training_reference(path.with_name("missing.json")) is None


def test_bad_cells_name_the_flag():
    with pytest.raises(ConfigError, match="--cells"):
        efficiency._cells("4by8")
    with pytest.raises(ConfigError, match="--cells"):
        efficiency._cells("0x8")


def test_tiny_run_end_to_end(tmp_path, llama_dir):
    paper = tmp_path / "paper.md"
    paper.write_text("# Paper\n\n## Efficiency\n\n<!-- bench efficiency: begin -->\nold\n"
                     "<!-- bench efficiency: end -->\n\n## After\n")
    out, figure = tmp_path / "eff.json", tmp_path / "figures" / "eff.png"
    cells = [(2, 8), (1, 4), (1, 128), (2, 128)]
    argv = TINY + ["--cells", ",".join(f"{b}x{s}" for b, s in cells), "--min-repeats", "2",
                   "--max-repeats", "3", "--base", str(llama_dir), "--json", str(out),
                   "--figure", str(figure), "--paper", str(paper),
                   "--train-json", str(tmp_path / "none.json")]
    assert efficiency.run(_args(argv)) == 0
    result = json.loads(out.read_text())
    lat = result["latency"]
    names = ["base", "lora_merged", "lora_unmerged", "adapter_h4", "adapter_l4", "adapter_h32",
             "adapter_l32"]
    assert [(c["batch"], c["seq"]) for c in lat["cells"]] == cells
    for c in lat["cells"]:
        assert list(c["variants"]) == names
        assert 2 <= c["repeats"] <= 3
        for v in c["variants"].values():
            assert len(v["times_ms"]) == c["repeats"] and v["median_ms"] > 0
        assert c["variants"]["base"]["pct_over_base"] == 0
        # one torch thread: the primary clock is this thread's CPU time, never above wall-clock
        for name in names:
            cpu, wall = c["variants"][name]["times_ms"], c["other_clock"][name]["times_ms"]
            assert all(a <= b + 0.01 for a, b in zip(cpu, wall))
    assert lat["clock"] == "cpu" and lat["other_clock"] == "wall"
    assert lat["variants"]["lora_merged"]["added_params"] == 0
    assert lat["variants"]["lora_unmerged"]["added_params"] == 2 * 4 * (64 + 3 * 64)
    # Houlsby: two adapters of (64 b + b) + (b 64 + 64) per layer; Lin one, plus its LayerNorm
    assert lat["variants"]["adapter_h4"]["added_params"] == 2 * 2 * (129 * 4 + 64)
    assert lat["variants"]["adapter_l4"]["added_params"] == 2 * (129 * 4 + 64 + 128)
    for key in ("float32_gflops", "bfloat16_gflops", "copy_bandwidth_gb_s",
                "float32_gflops_cpu_time", "bfloat16_gflops_cpu_time"):
        assert result["roofline_start"][key] > 0 and result["roofline_end"][key] > 0
    # the saved adapters: parameters from the config (an independent count), bytes on disk
    cfg = json.loads((llama_dir / "config.json").read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * cfg.get("head_dim", hidden // cfg["num_attention_heads"])
    rows = {(a["targets"], a["r"]): a for a in result["checkpoint"]["adapters"]}
    assert rows[("q,v", 4)]["params"] == layers * 4 * (2 * hidden + hidden + kv)
    assert rows[("q,v", 8)]["params"] == 2 * rows[("q,v", 4)]["params"]
    for a in rows.values():
        assert a["tensor_bytes"] < a["bytes"] < a["tensor_bytes"] + 65536  # + header
    assert result["checkpoint"]["base_bytes"] == (llama_dir / "model.safetensors").stat().st_size
    assert result["training"] is None
    # the doc block replaced in place, the figure written, and --from-json renders the same
    text = paper.read_text()
    assert text.count("<!-- bench efficiency: begin -->") == 1 and "\nold\n" not in text
    assert text.endswith("<!-- bench efficiency: end -->\n\n## After\n")
    assert "| Adapter^H (bottleneck 4) |" in text and "figures/eff.png" in text
    assert figure.stat().st_size > 0
    figure.unlink()
    paper.write_text(text.replace("Adapter^H (bottleneck 4) |", "edited |"))
    assert efficiency.run(_args(["--from-json", str(out), "--paper", str(paper),
                                 "--figure", str(figure)])) == 0
    assert paper.read_text() == text and figure.is_file()


def test_registered_in_the_cli():
    from lorafleet.cli import bench
    assert "efficiency" in bench.BENCHMARKS
