"""`lorafleet bench serve --tensor-parallel-size N` runs the tensor-parallel benchmark
(bench/serve_tp.py): its options carried over, and (slow) a real run whose measured volumes are
those of the partition (docs/engine.md): 2 L H b per token of all-reduce, H b more with the
embedding split, and the sampled rows' logits gathered (padded to ceil(V/N) per rank)."""
from __future__ import annotations

import argparse
import json

import pytest

from lorafleet.bench import serve, serve_tp


def _serve_args(argv):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(argv)


def test_serve_flags_carry_over():
    tp = serve.tensor_parallel_args(_serve_args(
        ["--tensor-parallel-size", "4", "--hidden", "256", "--vocab", "32000", "--repeats", "3",
         "--threads", "1", "--requests", "8", "--adapters", "10,100"]))
    assert tp.sizes == [1, 4]
    assert (tp.hidden, tp.vocab, tp.repeats, tp.requests, tp.adapters) == (256, 32000, 3, 8, 100)
    assert tp.single_threads == [1]
    assert tp.vocab_modes == list(serve_tp.VOCAB_MODES)
    default = serve.tensor_parallel_args(_serve_args(["--tensor-parallel-size", "2"]))
    assert default.requests == 32 and default.adapters == 16      # not the trace's 1000 / 5000


def test_estimate_splits_the_head_and_adds_its_collectives():
    """A100 estimate: one GPU is the same in every mode; split, lm_head's weights are read 1/N
    per rank for one gather, and the embedding split adds one all-reduce per step."""
    rows = {mode: serve_tp.a100_estimate(32, [1, 2, 8], vocab=mode)
            for mode in serve_tp.VOCAB_MODES}
    assert len({r[0]["step_ms"] for r in rows.values()}) == 1
    assert rows["lm_head"][2]["compute_ms"] < rows["replicated"][2]["compute_ms"]
    assert rows["replicated"][2]["gather_ms"] == 0 < rows["lm_head"][2]["gather_ms"]
    assert rows["sharded"][1]["allreduce_calls"] == rows["lm_head"][1]["allreduce_calls"] + 1 == 65


@pytest.mark.slow
def test_bench_serve_tensor_parallel_measures_the_partition(tmp_path):
    from lorafleet.cli import main

    out = tmp_path / "tp.json"
    hidden, layers, vocab = 128, 2, 1001
    assert main(["bench", "serve", "--tensor-parallel-size", "2", "--hidden", str(hidden),
                 "--layers", str(layers), "--heads", "4", "--kv-heads", "2", "--vocab",
                 str(vocab), "--requests", "4", "--adapters", "4", "--repeats", "1",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    runs = {(r["size"], r.get("vocab")): r for r in report["runs"]}
    assert {size for size, _ in runs} == {1, 2}
    for mode in serve_tp.VOCAB_MODES:
        run = runs[2, mode]
        b = 2 if run["dtype"] == "bfloat16" else 4
        per_token = (2 * layers + (mode == "sharded")) * hidden * b
        assert run["allreduce_bytes_per_token"] == per_token
        assert run["allreduce_per_step"] == 2 * layers + (mode == "sharded")
        if mode == "replicated":
            assert run["gather_per_step"] == 0
        else:       # every step samples all 4 rows here (no chunked middle): 4 x 2 x 501 x b
            assert run["gather_bytes_per_step"] == 4 * 2 * 501 * b
    assert "replicated" in report["a100_estimate"] and report["medians"]
