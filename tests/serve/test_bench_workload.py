"""The benchmark's workload generator and in-memory adapters (the timed runs are programs, not
tests: `lorafleet bench serve`)."""
from collections import Counter

from lorafleet.bench.workloads import make_adapter, make_requests
from lorafleet.models import ModelConfig


def test_requests_follow_the_s_lora_workload():
    reqs = make_requests(400, rate=10.0, num_adapters=50, alpha=1.0, input_len=(8, 64),
                         output_len=(8, 32), vocab=1000, seed=0)
    assert reqs == make_requests(400, 10.0, 50, 1.0, (8, 64), (8, 32), 1000, 0)
    arrivals = [r["arrival"] for r in reqs]
    assert arrivals == sorted(arrivals) and 25 < arrivals[-1] < 60      # ~ 400 / 10 s
    assert all(8 <= len(r["prompt"]) <= 64 and 8 <= r["output_len"] <= 32 for r in reqs)
    popularity = Counter(r["adapter"] for r in reqs)
    assert popularity[0] > popularity[10] > 0 and popularity[0] > 400 / 50 * 3  # power law


def test_in_memory_adapters_fit_the_engine_format():
    config = ModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    peft_config, tensors = make_adapter(1, config, [8, 16], seed=0)
    assert peft_config["target_modules"] == ["q_proj", "v_proj"] and peft_config["r"] == 16
    key = "base_model.model.model.layers.1.self_attn.v_proj"
    assert tensors[f"{key}.lora_A.weight"].shape == (16, 64)
    assert tensors[f"{key}.lora_B.weight"].shape == (32, 16)
    assert make_adapter(0, config, [8, 16], 0)[0]["target_modules"][-1] == "o_proj"


def test_best_runs_keep_the_fastest_of_each_configuration():
    from lorafleet.bench.serve import best_runs

    runs = [{"system": "base-only", "adapters": 0, "tokens_per_s": 100.0},
            {"system": "lorafleet", "adapters": 10, "tokens_per_s": 60.0},
            {"system": "base-only", "adapters": 0, "tokens_per_s": 120.0},
            {"system": "lorafleet", "adapters": 10, "tokens_per_s": 90.0}]
    best = {(r["system"], r["adapters"]): r for r in best_runs(runs)}
    assert best["base-only", 0]["tokens_per_s"] == 120.0
    assert best["lorafleet", 10]["tokens_per_s"] == 90.0 and best["lorafleet", 10]["vs_base"] == 0.75


def test_best_runs_leave_out_the_spread_check_and_report_medians():
    from lorafleet.bench.serve import best_runs

    runs = [{"system": "base-only", "adapters": 0, "tokens_per_s": 100.0,
             "tokens_per_cpu_s": 200.0},
            {"system": "lorafleet", "adapters": 10, "tokens_per_s": 80.0, "tokens_per_cpu_s": 150.0},
            {"system": "base-only", "adapters": 0, "tokens_per_s": 110.0,
             "tokens_per_cpu_s": 210.0},
            {"system": "lorafleet", "adapters": 10, "tokens_per_s": 99.0, "tokens_per_cpu_s": 180.0},
            {"system": "base-only", "adapters": 0, "tokens_per_s": 90.0, "tokens_per_cpu_s": 190.0},
            {"system": "lorafleet", "adapters": 10, "tokens_per_s": 88.0, "tokens_per_cpu_s": 190.0},
            {"system": "base-only", "adapters": 0, "tokens_per_s": 150.0, "tokens_per_cpu_s": 1.0,
             "spread_check": True},
            {"system": "peft", "adapters": 10, "tokens_per_s": 20.0}]
    best = {(r["system"], r["adapters"]): r for r in best_runs(runs)}
    assert best["base-only", 0]["tokens_per_s"] == 110.0 and best["base-only", 0]["runs"] == 3
    assert best["lorafleet", 10]["vs_base"] == 0.9
    assert best["lorafleet", 10]["median_tokens_per_s"] == 88.0
    assert best["lorafleet", 10]["vs_base_median"] == 0.88
    assert best["lorafleet", 10]["vs_base_cpu"] == 180.0 / 200.0
    assert "vs_base_cpu" not in best["peft", 10]             # measured without CPU time


def test_kernels_benchmark_runs_and_writes_json(tmp_path):
    """`lorafleet bench kernels` at a toy size: every timing present and positive."""
    import argparse
    import json

    from lorafleet.bench import kernels

    parser = argparse.ArgumentParser()
    kernels.add_arguments(parser)
    args = parser.parse_args(["--hidden", "128", "--heads", "4,2", "--decode-rows", "5",
                              "--decode-adapters", "3", "--prefill-segments", "2x9",
                              "--context", "12", "--repeats", "2", "--json",
                              str(tmp_path / "k.json")])
    assert kernels.run(args) == 0
    results = json.loads((tmp_path / "k.json").read_text())
    assert results["lora_decode"]["rows"] == 5 and results["lora_prefill"]["rows"] == 18
    timings = [v for case in results.values() for k, v in case.items() if k.endswith("_us")]
    assert timings and all(t > 0 for t in timings)
