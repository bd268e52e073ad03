"""The serving benchmark's workload (traces, adapter folders) and its measurements (the timed
runs are programs, not tests: `lorafleet bench serve`; tests/serve/test_bench_serve_smoke.py runs
it at a toy size)."""
from collections import Counter

import numpy as np
import pytest

from lorafleet.bench.trace import percentile, summarize
from lorafleet.bench.workloads import (ALL_LINEAR, ATTENTION, adapter_name, adapter_pool_pages,
                                       adapter_spec, distinct_adapters, make_adapter,
                                       make_requests, write_adapter_store)
from lorafleet.errors import ConfigError
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


@pytest.mark.parametrize("n", [10, 100, 1000, 5000])
def test_the_benchmark_uniform_trace_touches_enough_adapters(n):
    """Issue 12: with uniform popularity the trace touches >= min(N, requests / 2) adapters
    (the benchmark's own trace: 1,000 requests, seed 0); power law touches far fewer."""
    uniform = make_requests(1000, 100.0, n, 1.0, (8, 64), (8, 32), 8192, 0, "uniform")
    power = make_requests(1000, 100.0, n, 1.0, (8, 64), (8, 32), 8192, 0, "power-law")
    assert distinct_adapters(uniform) >= min(n, 500)
    counts = Counter(r["adapter"] for r in uniform)
    assert max(counts.values()) <= 1000 / n * 3 + 5             # no adapter dominates
    if n >= 1000:
        assert distinct_adapters(power) < distinct_adapters(uniform)


def test_traces_differ_only_in_what_is_varied():
    """Same prompts and lengths at every rate, N and popularity; arrivals scale with 1/rate."""
    a = make_requests(200, 10.0, 100, 1.0, (8, 64), (8, 32), 1000, 3, "power-law")
    b = make_requests(200, 40.0, 5000, 1.0, (8, 64), (8, 32), 1000, 3, "uniform")
    base = make_requests(200, 10.0, 0, 1.0, (8, 64), (8, 32), 1000, 3)
    assert [r["prompt"] for r in a] == [r["prompt"] for r in b] == [r["prompt"] for r in base]
    assert [r["output_len"] for r in a] == [r["output_len"] for r in b]
    assert all(r["adapter"] is None for r in base)
    assert [r["arrival"] / 4 for r in a] == pytest.approx([r["arrival"] for r in b])
    gaps = np.diff([0.0] + [r["arrival"] for r in make_requests(
        4000, 25.0, 0, 1.0, (1, 2), (1, 2), 10, 1)])
    assert gaps.mean() == pytest.approx(1 / 25, rel=0.05)       # Poisson: exponential gaps
    assert gaps.std() == pytest.approx(1 / 25, rel=0.08)
    with pytest.raises(ConfigError, match="popularity"):
        make_requests(1, 1.0, 1, 1.0, (1, 2), (1, 2), 10, 0, "zipf")


def _tiny_config():
    return ModelConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=100)


def test_adapter_specs_mix_ranks_and_targets():
    specs = [adapter_spec(i, seed=0) for i in range(800)]
    ranks = Counter(r for r, _ in specs)
    assert set(ranks) == {8, 16, 32, 64} and ranks[8] > ranks[16] > ranks[32] > ranks[64]
    share = sum(t == ALL_LINEAR for _, t in specs) / len(specs)
    assert 0.2 < share < 0.3 and all(t in (ALL_LINEAR, ATTENTION) for _, t in specs)
    assert specs == [adapter_spec(i, seed=0) for i in range(800)]
    assert specs != [adapter_spec(i, seed=1) for i in range(800)]


def test_adapter_folders_load_in_peft(tmp_path):
    """The store's folders are PEFT adapters: PeftModel loads them into a transformers Llama
    with every tensor where the keys say, and the adapted output differs from the base."""
    import torch
    import transformers
    from peft import PeftModel

    config = _tiny_config()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100)).eval()
    sizes = write_adapter_store(tmp_path / "store", 8, config, seed=0)
    assert sizes["count"] == 8 and sizes["min_bytes"] > 0
    assert sizes["total_bytes"] == sum(f.stat().st_size for f in (tmp_path / "store").rglob("*")
                                       if f.is_file())
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base = hf(ids).logits
    index = next(i for i in range(8) if adapter_spec(i, 0)[1] == ALL_LINEAR)
    name = adapter_name(index)
    model = PeftModel.from_pretrained(hf, tmp_path / "store" / name, adapter_name=name).eval()
    peft_config, tensors = make_adapter(index, config, seed=0)
    rank, targets = adapter_spec(index, 0)
    assert model.peft_config[name].r == rank == peft_config["r"]
    assert set(model.peft_config[name].target_modules) == set(targets)
    down = model.base_model.model.model.layers[1].mlp.down_proj
    torch.testing.assert_close(
        down.lora_A[name].weight,
        tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].float())
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base)
    assert adapter_pool_pages(config, rank, targets) == 2 * rank * (
        4 * 2 + 3 * (1 + 3))      # per layer: q,k,v,o one page per row; mlp 1 + 3 pages


def test_percentile_is_nearest_rank():
    values = list(np.random.default_rng(0).exponential(size=101))
    for q in (1, 50, 90, 99, 100):
        assert percentile(values, q) == np.percentile(values, q, method="inverted_cdf")
    assert percentile([], 50) is None and percentile([3.0], 99) == 3.0


def test_summary_counts_failures_against_the_slo():
    requests = [{"id": f"r{i}", "arrival": float(i), "output_len": 4} for i in range(4)]
    timings = {"first": {"r0": 0.5, "r1": 3.0, "r2": 2.2},       # r3 never started
               "done": {"r0": 1.0, "r1": 4.0, "r2": 2.5, "r3": 9.0},
               "gaps": [0.1, 0.2, 0.3, 0.4], "errors": {"r2": "adapter file corrupt",
                                                       "r3": "deadline"},
               "elapsed": 10.0, "cpu_seconds": 5.0}
    out = summarize(requests, timings, slo_ttft_s=1.0)
    assert out["requests"] == 2 and out["failed"] == 2 and out["tokens"] == 8
    assert out["slo_attainment"] == 0.25         # r0 only: r1 late, r2 failed, r3 never ran
    assert out["p50_ttft_s"] == 0.5 and out["p99_ttft_s"] == 2.0
    assert out["p50_itl_s"] == 0.2 and out["p99_itl_s"] == 0.4
    assert out["tokens_per_s"] == 0.8 and out["tokens_per_cpu_s"] == 1.6
    assert out["first_errors"] == ["adapter file corrupt", "deadline"]


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
