"""Tensor-parallel serving against one process, same machine, same workload (issue 15).

    python -m lorafleet.bench.serve_tp [--hidden 1024 --layers 4 --heads 16 --kv-heads 4]
        [--adapters 16 --requests 32 --output 32 --repeats 2] [--json docs/results/serve-tp.json]

A random Llama (bf16 checkpoint) and random PEFT adapters of mixed ranks (bench/workloads.py)
are built in a temporary folder; every request is submitted at once and the engine stepped to
the end, for --tensor-parallel-size 1 and 2 alternately (--repeats times each, fresh engine
each run). Torch threads: cores / size per rank, so both sizes use the same cores. Reported
per size: generated tokens/s, mean prefill and decode step time, and per step the all-reduces
(count, bytes, seconds on rank 0) and the control bytes piped to each worker.

From the measured volume per token (2 all-reduces of hidden_size numbers per layer: nothing
else, the LoRA partition adds no collective) `a100_estimate` gives a paper estimate of a decode
step at 2/4/8 ranks for Llama-7B on A100-80GB with NVLink (S-LoRA's tensor-parallel setting);
its constants are stated in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

# Paper-estimate constants (A100-80GB SXM, NVLink 3; NCCL all-reduce on 8 GPUs in one node).
A100 = {"hbm_bytes_per_s": 2.0e12, "bf16_flops_per_s": 312e12,
        "allreduce_bus_bytes_per_s": 230e9,   # nccl-tests all_reduce busbw, DGX A100, large msgs
        "allreduce_latency_s": 15e-6}         # small-message NCCL all-reduce on NVLink
LLAMA_7B = {"hidden": 4096, "layers": 32, "params": 6.74e9, "intermediate": 11008}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt", type=int, nargs=2, default=[8, 64], metavar=("MIN", "MAX"))
    parser.add_argument("--output", type=int, default=32)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--single-threads", type=int, nargs="+", default=None,
                        help="torch threads of the size-1 runs (default: all cores, and 1: on "
                             "a shared machine one thread per process suffers least from "
                             "other load)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", type=Path, default=None)


def workload(args, names: list[str]) -> list[tuple[str, list[int], str | None]]:
    rng = random.Random(0)
    return [(f"r{i}", [rng.randrange(2, args.vocab) for _ in range(rng.randint(*args.prompt))],
             rng.choice(names + [None])) for i in range(args.requests)]


def run_once(model_dir: Path, store: Path, size: int, threads: int, args, requests) -> dict:
    import torch

    from lorafleet.serve.engine import Engine, EngineConfig, SamplingParams

    torch.set_num_threads(threads)
    engine = Engine(model_dir, config=EngineConfig(tensor_parallel_size=size, dtype=args.dtype))
    try:
        engine.register_store(store)
        params = SamplingParams(max_tokens=args.output, ignore_eos=True)
        engine.generate([requests[0][1]], [requests[0][2]], params)      # warm up
        for name in {n for *_, n in requests if n}:                     # adapters resident
            engine.generate([[5, 6]], [name], SamplingParams(max_tokens=1))
        before = engine.stats()
        engine.step_log = []
        started = time.perf_counter()
        for rid, prompt, name in requests:
            engine.add_request(rid, prompt, name, params)
        while engine.has_work():
            engine.step()
        seconds = time.perf_counter() - started
        after = engine.stats()
        steps = engine.step_log
        decode = [s.seconds for s in steps if not s.is_prefill]
        prefill = [s.seconds for s in steps if s.is_prefill]
        result = {"size": size, "dtype": str(engine.runner.dtype).removeprefix("torch."),
                  "seconds": seconds, "steps": len(steps),
                  "generated_tokens_per_s": args.requests * args.output / seconds,
                  "decode_step_ms": 1e3 * statistics.mean(decode) if decode else None,
                  "prefill_step_ms": 1e3 * statistics.mean(prefill) if prefill else None,
                  "tokens_run": sum(s.num_tokens for s in steps),
                  "torch_threads_per_rank": torch.get_num_threads()}
        if size > 1:
            delta = {k: after[k] - before[k] for k in
                     ("allreduce_calls", "allreduce_tensor_bytes", "allreduce_seconds",
                      "tp_steps", "tp_control_bytes")}
            n = delta["tp_steps"]
            result.update({
                "allreduce_per_step": delta["allreduce_calls"] / n,
                "allreduce_bytes_per_step": delta["allreduce_tensor_bytes"] / n,
                "allreduce_bytes_per_token": delta["allreduce_tensor_bytes"] / result["tokens_run"],
                "allreduce_ms_per_step": 1e3 * delta["allreduce_seconds"] / n,
                "allreduce_share_of_time": delta["allreduce_seconds"] / seconds,
                "control_bytes_per_step": delta["tp_control_bytes"] / n})
        return result
    finally:
        engine.close()


def a100_estimate(batch_tokens: int, ranks: list[int], model: dict = LLAMA_7B,
                  hw: dict = A100, dtype_bytes: int = 2) -> list[dict]:
    """Decode step time at each rank count: weights read once per step (split N ways) or the
    matmul FLOPs, whichever is larger, plus 2 all-reduces per layer of batch x hidden numbers
    (ring: each rank moves 2 (N-1)/N of it) at the stated bus bandwidth and latency."""
    out = []
    for n in ranks:
        compute = max(model["params"] * dtype_bytes / n / hw["hbm_bytes_per_s"],
                      2 * model["params"] * batch_tokens / n / hw["bf16_flops_per_s"])
        message = batch_tokens * model["hidden"] * dtype_bytes
        calls = 2 * model["layers"] if n > 1 else 0
        comm = calls * (hw["allreduce_latency_s"]
                        + 2 * (n - 1) / n * message / hw["allreduce_bus_bytes_per_s"])
        out.append({"ranks": n, "compute_ms": 1e3 * compute, "allreduce_ms": 1e3 * comm,
                    "step_ms": 1e3 * (compute + comm), "allreduce_calls": calls,
                    "allreduce_message_bytes": message})
    base = out[0]["step_ms"]
    for row in out:
        row["speedup_vs_1"] = base / row["step_ms"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args) -> int:
    """`lorafleet bench serve_tp ...` and `python -m lorafleet.bench.serve_tp ...`."""
    from lorafleet.bench.workloads import make_random_llama, write_adapter_store
    from lorafleet.models.config import ModelConfig

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, store = Path(tmp) / "model", Path(tmp) / "adapters"
        make_random_llama(model_dir, args.hidden, args.layers, args.heads, args.kv_heads,
                          args.vocab)
        config = ModelConfig.from_hf(model_dir)
        write_adapter_store(store, args.adapters, config, seed=0)
        names = sorted(p.name for p in store.iterdir())
        requests = workload(args, names)
        cores = os.cpu_count() or 1
        variants = [(1, t) for t in (args.single_threads or sorted({cores, 1}, reverse=True))]
        variants += [(n, max(1, cores // n)) for n in args.sizes if n > 1]
        runs = []
        for repeat in range(args.repeats):
            for size, threads in variants:
                result = run_once(model_dir, store, size, threads, args, requests)
                result["repeat"] = repeat
                runs.append(result)
                print(json.dumps(result), flush=True)
    best = {f"{size}x{threads}": max(
        (r for r in runs if (r["size"], r["torch_threads_per_rank"]) == (size, threads)),
        key=lambda r: r["generated_tokens_per_s"]) for size, threads in variants}
    report = {
        "benchmark": "serve_tp", "command": " ".join(__import__("sys").argv),
        "machine": {"cpu_count": os.cpu_count(), "loadavg": os.getloadavg()},
        "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                  "kv_heads": args.kv_heads, "vocab": args.vocab,
                  "intermediate": config.intermediate_size},
        "workload": {"requests": args.requests, "prompt": args.prompt, "output": args.output,
                     "adapters": args.adapters},
        "runs": runs, "best (size x threads per rank)": best,
        "a100_estimate": {"model": LLAMA_7B, "hardware": A100,
                          "decode_batch_32": a100_estimate(32, [1, 2, 4, 8]),
                          "decode_batch_256": a100_estimate(256, [1, 2, 4, 8])}}
    for key, r in best.items():
        line = (f"size x threads {key}: {r['generated_tokens_per_s']:.1f} tok/s, decode step "
                f"{r['decode_step_ms']:.1f} ms")
        if r["size"] > 1:
            line += (f", {r['allreduce_per_step']:.0f} all-reduces/step "
                     f"({r['allreduce_bytes_per_token']:.0f} B/token, "
                     f"{r['allreduce_ms_per_step']:.2f} ms/step, "
                     f"{100 * r['allreduce_share_of_time']:.0f}% of the time), control "
                     f"{r['control_bytes_per_step']:.0f} B/step")
        print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
