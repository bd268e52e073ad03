"""`lorafleet bench serve` end to end at a toy size: every planned run completes, the counters
are the trace's, a small pool loads and evicts, and the report and plots come from the JSON."""
import argparse
import json

import pytest

from lorafleet.bench import serve
from lorafleet.bench.serve_report import BEGIN, END, sections
from lorafleet.bench.serve_run import trace_for
from lorafleet.bench.workloads import distinct_adapters

TOY = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--vocab", "256",
       "--adapters", "4,12", "--requests", "16", "--rate", "200", "--input-len", "4,12",
       "--output-len", "2,6", "--ranks", "8,16", "--slo-ttft", "5",
       "--rate-adapters", "12", "--rate-fractions", "3",
       # a pool that holds the batch's KV and about two adapters: loads and evictions happen
       "--hand-adapters", "12", "--hand-config",
       '{"dtype": "float32", "num_pages": 700, "max_num_seqs": 4}',
       "--merge-swap-requests", "4", "--merge-swap-adapters", "4",
       "--peft-requests", "4", "--peft-adapters", "4",
       "--heavy-requests", "6", "--heavy-adapters", "3", "--heavy-input-len", "4,24",
       "--heavy-output-len", "2,4", "--heavy-ranks", "8,64", "--in-process"]


def _args(extra):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(extra)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    assert serve.run(_args(TOY + ["--json", str(tmp / "r.json"), "--plot-dir", str(tmp / "img"),
                                  "--work-dir", str(tmp / "work")])) == 0
    return tmp, json.loads((tmp / "r.json").read_text())


def test_every_planned_run_completes(results):
    _, data = results
    runs = data["runs"]
    assert not [r for r in runs if "error" in r]
    kinds = {(r["system"], r["config"], r.get("workload"), r["sweep"]) for r in runs}
    assert kinds == {("base-only", "default", None, "scaling"),
                     ("lorafleet", "default", None, "scaling"),
                     ("base-only", "hand-sized", None, "baselines"),
                     ("lorafleet", "hand-sized", None, "baselines"),
                     ("merge-swap", "default", None, "baselines"),
                     ("peft", "default", None, "baselines"),
                     ("base-only", "default", "heavy", "heavy"),
                     ("lorafleet", "default", "heavy", "heavy"),
                     ("lorafleet", "default", None, "rate")}
    for r in runs:
        assert r["failed"] == 0 and r["tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0
        assert r["p50_ttft_s"] <= r["p99_ttft_s"] and r["p50_itl_s"] <= r["p99_itl_s"]
        assert 0 <= r["slo_attainment"] <= 1
    # one rate of the sweep (3x the base model's req/s, to keep the test short), two popularities
    sweep = [r for r in runs if r["sweep"] == "rate"]
    base = next(r for r in runs if r["system"] == "base-only" and r["sweep"] == "scaling")
    assert {r["rate"] for r in sweep} == {round(3 * base["requests_per_s"], 2)}
    assert len(sweep) == 2 and data["machine"]["matmul_flops"] > 0


def test_counters_are_the_traces(results):
    _, data = results
    for r in data["runs"]:
        if r["system"] != "lorafleet":
            continue
        spec = dict(r, trace=dict(requests=16 if r.get("workload") != "heavy" else 6,
                                  input_len=data["workload"]["input_len"], vocab=256, seed=0,
                                  alpha=1.0, output_len=data["workload"]["output_len"]))
        trace = trace_for(dict(spec, num_adapters=r["adapters"]))
        if r.get("workload") != "heavy":
            assert r["tokens"] == sum(x["output_len"] for x in trace)
            assert r["distinct_adapters"] == distinct_adapters(trace)
        assert r["loads"] >= r["distinct_adapters"] and r["register_s"] >= 0
    hand = [r for r in data["runs"] if r["config"] == "hand-sized" and r["system"] == "lorafleet"]
    assert hand and all(r["evictions"] > 0 and r["loads"] >= r["distinct_adapters"]
                        for r in hand)
    assert all(r["engine"]["num_pages"] == 700 for r in hand)


def test_report_and_plots_come_from_the_json(results, tmp_path):
    tmp, data = results
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nbefore\n\n{BEGIN}\nSTALE TABLE\n{END}\n\nafter\n")
    assert serve.run(_args(["--report", str(tmp / "r.json"), "--update-doc", str(doc),
                            "--plot-dir", str(tmp_path / "img")])) == 0
    text = doc.read_text()
    assert "STALE TABLE" not in text and text.startswith("# Benchmarks\n\nbefore") and \
        text.rstrip().endswith("after")
    assert "### Scaling with N" in text and "| lorafleet (hand-sized) | 12 |" in text
    assert "merge-and-swap" in text and "PEFT per-row" in text and "Heavy mix" in text
    parts = sections(data)
    assert len(parts["scaling"]) == 1 + 2 * 2
    # the rate table: the sweep's runs and the saturating point, for both popularities
    assert sorted((r["popularity"], r["sweep"]) for r in parts["rates"]) == [
        ("power-law", "rate"), ("power-law", "scaling"), ("uniform", "rate"),
        ("uniform", "scaling")]
    for name in ("serve_vs_adapters.png", "serve_vs_rate.png"):
        assert (tmp_path / "img" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp / "img" / name).is_file()


@pytest.mark.slow
def test_a_run_in_its_own_process_measures_the_snapshot(results, tmp_path):
    """The full benchmark runs each configuration in a fresh process importing a snapshot of
    the package: its result is its own (peak RSS from that process, not the parent's)."""
    tmp, data = results
    args = _args(TOY)
    spec = next(s for s in serve.plan(args, [4], ["uniform"]) if s["system"] == "lorafleet")
    full = serve.full_spec(spec, args, data["workload"], data, tmp / "work", data["machine"])
    code = serve.snapshot_package(tmp_path)
    assert (code / "lorafleet" / "bench" / "serve_run.py").is_file()
    r = serve.run_one(full, tmp_path, code=code)
    assert "error" not in r, r.get("stderr_tail")
    assert r["requests"] == 16 and r["loads"] >= r["distinct_adapters"] > 0
    assert r["rss_start_bytes"] < r["rss_engine_bytes"] <= r["peak_rss_bytes"]
