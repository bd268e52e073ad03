"""`lorafleet bench roofline`: the machine's two ceilings (DESIGN.md sec. 4), measured now: the
matmul rate in bf16 and fp32 and the memory bandwidth, which every step time in
docs/benchmarks.md is read against.

    lorafleet bench roofline [--threads 0] [--repeats 5] [--json docs/results/roofline.json]
                             [--update-doc docs/benchmarks.md]
    lorafleet bench roofline --from-json docs/results/roofline.json --update-doc docs/benchmarks.md

- matmul: an n x n @ n x n product (2 n^3 FLOPs), best and mean of --repeats after one warm-up;
- bandwidth: a 256 MB fp32 tensor copied (read + write bytes) and summed (read bytes), best of
  --repeats; 256 MB is far beyond any cache, so this is DRAM.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

COPY_BYTES = 256 * 2**20  # well past the last-level cache of any CPU this runs on


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=2048, help="matmul size n (n x n @ n x n)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="measure nothing: render the table of this saved JSON")
    parser.add_argument("--update-doc", type=Path, default=None,
                        help="rewrite the `bench roofline` block of this doc")


def seconds(fn, repeats: int, clock=time.perf_counter) -> list[float]:
    """`repeats` timings of `fn` on `clock` after one untimed call."""
    fn()  # warm-up: allocation, first-touch of pages, oneDNN primitive creation
    samples = []
    for _ in range(repeats):
        start = clock()
        fn()
        samples.append(clock() - start)
    return samples


def matmul_seconds(n: int, dtype, repeats: int, clock=time.perf_counter) -> list[float]:
    """Timings of an n x n @ n x n product (2 n^3 FLOPs) in `dtype`: every bench's matmul
    ceiling (train, serve and efficiency read theirs from here)."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return seconds(lambda: a @ b, repeats, clock)


def copy_seconds(nbytes: int, repeats: int, src=None) -> list[float]:
    """Timings of copying an fp32 tensor of `nbytes` (or `src`): 2 * nbytes moved per copy."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32) if src is None else src
    dst = torch.empty_like(src)
    return seconds(lambda: dst.copy_(src), repeats)


def measure(n: int, repeats: int) -> dict:
    import torch

    out = {"n": n, "repeats": repeats, "threads": torch.get_num_threads(), "matmul": {}}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        t = matmul_seconds(n, dtype, repeats)
        out["matmul"][name] = {"best_gflops": 2 * n ** 3 / min(t) / 1e9,
                               "mean_gflops": 2 * n ** 3 / statistics.mean(t) / 1e9}
    src = torch.ones(COPY_BYTES // 4, dtype=torch.float32)
    copy = copy_seconds(COPY_BYTES, repeats, src)
    total = seconds(lambda: src.sum(), repeats)
    out["bandwidth"] = {"bytes": COPY_BYTES,
                        "copy_gb_s": 2 * COPY_BYTES / min(copy) / 1e9,
                        "sum_gb_s": COPY_BYTES / min(total) / 1e9}
    return out


def markdown(report: dict) -> str:
    """The docs/benchmarks.md block: the table and what it implies for a weight matmul."""
    from lorafleet.bench.doc_block import run_line

    m, bw, n = report["matmul"], report["bandwidth"], report["n"]
    low, high = sorted((bw["copy_gb_s"], bw["sum_gb_s"]))
    # bf16 weights: 2 bytes and 2 FLOPs (one multiply-add) per parameter per token, so a weight
    # matmul is compute-bound above rate / bandwidth tokens.
    crossover = m["bf16"]["best_gflops"] / high
    return "\n".join([
        run_line(report["run"]), "",
        "| quantity | measured | how |", "|---|---|---|",
        f"| bf16 matmul rate | {m['bf16']['best_gflops']:.0f} GFLOP/s (mean "
        f"{m['bf16']['mean_gflops']:.0f}) | {n}x{n} @ {n}x{n} bf16, best of "
        f"{report['repeats']}, {report['threads']} thread(s) |",
        f"| fp32 matmul rate | {m['fp32']['best_gflops']:.0f} GFLOP/s (mean "
        f"{m['fp32']['mean_gflops']:.0f}) | same in fp32 |",
        f"| memory bandwidth | {low:.0f}-{high:.0f} GB/s | {bw['bytes'] // 2**20} MB fp32 tensor "
        f"copy (read + write bytes) and sum, best of {report['repeats']} |", "",
        f"Consequence: a bf16 matmul of a weight matrix is compute-bound once a step carries more "
        f"than about {m['bf16']['best_gflops']:.0f}/{high:.0f} x 2 bytes/param / 2 FLOP/param "
        f"~ {crossover:.0f} tokens; decode with fewer rows is bandwidth-bound."])


def run(args) -> int:
    import torch

    from lorafleet.bench.doc_block import command_line, run_ended, run_info, write_block, write_json

    if args.from_json is not None:
        report = json.loads(args.from_json.read_text())
    else:
        info = run_info(command_line("roofline", args))
        if args.threads:
            torch.set_num_threads(args.threads)
        report = measure(args.n, args.repeats)
        report["run"] = run_ended(info)
        if args.json:
            write_json(args.json, report, indent=2)
    print(markdown(report))
    if args.update_doc:
        write_block(args.update_doc, "roofline", markdown(report))
    return 0
