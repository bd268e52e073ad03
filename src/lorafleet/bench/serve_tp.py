"""Tensor-parallel serving against one process, same machine, same workload (issue 15).

    lorafleet bench serve --tensor-parallel-size 2 [--repeats 2] [--json docs/results/serve-tp.json]
    lorafleet bench serve_tp [--sizes 1 2] [--vocab-modes replicated lm_head sharded]
        [--hidden 1024 --layers 4 --heads 16 --kv-heads 4 --vocab 32000]
        [--adapters 16 --requests 32 --output 32 --repeats 2] [--json ...]
    lorafleet bench serve_tp --from-json docs/results/serve-tp*.json --update-doc docs/benchmarks.md

A random Llama (bf16 checkpoint) and random PEFT adapters of mixed ranks (bench/workloads.py)
are built in a temporary folder; every request is submitted at once and the engine stepped to
the end, for one process and for each tensor-parallel size and way of holding the embedding
and lm_head (EngineConfig.tensor_parallel_vocab) alternately (--repeats times each, fresh engine
each run). Torch threads: cores / size per rank, so every size uses the same cores. Reported per
run: generated tokens/s, mean prefill and decode step time, and per step the collectives
(all-reduces and logit gathers: count, bytes, seconds on rank 0) and the control bytes piped to
each worker.

From the measured collectives per token (all-reduces of hidden_size numbers per layer: 2, the
LoRA partition adds none; with the vocabulary split, the logits gather and the embedding's
all-reduce) `a100_estimate` gives a paper estimate of a decode step at 2/4/8 ranks for Llama-7B
on A100-80GB with NVLink (S-LoRA's tensor-parallel setting); its constants are in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lorafleet.serve.engine_config import VOCAB_MODES

# Paper-estimate constants (A100-80GB SXM, NVLink 3; NCCL all-reduce on 8 GPUs in one node).
A100 = {"hbm_bytes_per_s": 2.0e12, "bf16_flops_per_s": 312e12,
        "allreduce_bus_bytes_per_s": 230e9,   # nccl-tests all_reduce busbw, DGX A100, large msgs
        "allreduce_latency_s": 15e-6}         # small-message NCCL all-reduce on NVLink
LLAMA_7B = {"hidden": 4096, "layers": 32, "params": 6.74e9, "intermediate": 11008,
            "vocab": 32000}


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
    parser.add_argument("--vocab-modes", nargs="+", default=list(VOCAB_MODES),
                        choices=VOCAB_MODES, help="embedding / lm_head held replicated or split "
                        "by vocabulary, for every size above 1 (EngineConfig."
                        "tensor_parallel_vocab)")
    parser.add_argument("--single-threads", type=int, nargs="+", default=None,
                        help="torch threads of the size-1 runs (default: all cores, and 1: on "
                             "a shared machine one thread per process suffers least from "
                             "other load)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, nargs="+", default=None,
                        help="only render the table from these result files")
    parser.add_argument("--update-doc", type=Path, default=None,
                        help="write the table into this markdown's `bench serve_tp` block")


def workload(args, names: list[str]) -> list[tuple[str, list[int], str | None]]:
    rng = random.Random(0)
    return [(f"r{i}", [rng.randrange(2, args.vocab) for _ in range(rng.randint(*args.prompt))],
             rng.choice(names + [None])) for i in range(args.requests)]


def run_once(model_dir: Path, store: Path, size: int, threads: int, args, requests,
             vocab: str = "replicated") -> dict:
    import torch

    from lorafleet.serve.engine import Engine, EngineConfig, SamplingParams

    torch.set_num_threads(threads)
    engine = Engine(model_dir, config=EngineConfig(tensor_parallel_size=size, dtype=args.dtype,
                                                   tensor_parallel_vocab=vocab))
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
            result.update(communication(before, after, size, result["tokens_run"], seconds))
            result["vocab"] = vocab
        return result
    finally:
        engine.close()


def communication(before: dict, after: dict, size: int, tokens: int, seconds: float) -> dict:
    """Per step (and per token) from two engine.stats(): collectives (tensor bytes: the
    all-reduced / gathered tensor; wire bytes: what each rank sends in a ring all-reduce,
    2 (N-1)/N of it, and what the other ranks send rank 0 in a gather, (N-1)/N of it), their
    seconds on rank 0, and the pickled control messages piped to each worker."""
    delta = {k: after[k] - before[k] for k in
             ("allreduce_calls", "allreduce_tensor_bytes", "allreduce_seconds", "gather_calls",
              "gather_tensor_bytes", "gather_seconds", "tp_steps", "tp_control_bytes")}
    n = delta["tp_steps"]
    wire = (2 * (size - 1) / size * delta["allreduce_tensor_bytes"]
            + (size - 1) / size * delta["gather_tensor_bytes"])
    comm_s = delta["allreduce_seconds"] + delta["gather_seconds"]
    return {
        "allreduce_per_step": delta["allreduce_calls"] / n,
        "allreduce_bytes_per_step": delta["allreduce_tensor_bytes"] / n,
        "allreduce_bytes_per_token": delta["allreduce_tensor_bytes"] / tokens,
        "allreduce_ms_per_step": 1e3 * delta["allreduce_seconds"] / n,
        "gather_per_step": delta["gather_calls"] / n,
        "gather_bytes_per_step": delta["gather_tensor_bytes"] / n,
        "gather_ms_per_step": 1e3 * delta["gather_seconds"] / n,
        "comm_wire_bytes_per_step": wire / n,
        "comm_ms_per_step": 1e3 * comm_s / n,
        "allreduce_share_of_time": delta["allreduce_seconds"] / seconds,
        "comm_share_of_time": comm_s / seconds,
        "control_bytes_per_step": delta["tp_control_bytes"] / n}


def a100_estimate(batch_tokens: int, ranks: list[int], model: dict = LLAMA_7B,
                  hw: dict = A100, dtype_bytes: int = 2, vocab: str = "replicated",
                  allreduces_per_layer: float = 2.0) -> list[dict]:
    """Decode step time at each rank count: weights read once per step (the body split N ways;
    lm_head split too unless replicated, when rank 0 reads it whole) or the matmul FLOPs,
    whichever is larger, plus `allreduces_per_layer` all-reduces per layer of batch x hidden
    numbers (ring: each rank moves 2 (N-1)/N of it; 2, as measured) and, vocabulary split, the
    embedding's all-reduce and one gather of batch x vocab logits into rank 0 ((N-1)/N of it
    through its links), at the stated bus bandwidth and latency."""
    head = model["vocab"] * model["hidden"]
    out = []
    for n in ranks:
        split = vocab != "replicated" and n > 1
        per_rank = (model["params"] - head) / n + (head / n if split else head)
        compute = max(per_rank * dtype_bytes / hw["hbm_bytes_per_s"],
                      2 * per_rank * batch_tokens / hw["bf16_flops_per_s"])
        message = batch_tokens * model["hidden"] * dtype_bytes
        calls = (round(allreduces_per_layer * model["layers"]) + (vocab == "sharded")
                 if n > 1 else 0)
        comm = calls * (hw["allreduce_latency_s"]
                        + 2 * (n - 1) / n * message / hw["allreduce_bus_bytes_per_s"])
        logits = batch_tokens * model["vocab"] * dtype_bytes
        gather = (hw["allreduce_latency_s"] + (n - 1) / n * logits
                  / hw["allreduce_bus_bytes_per_s"]) if split else 0.0
        out.append({"ranks": n, "vocab": vocab, "compute_ms": 1e3 * compute,
                    "allreduce_ms": 1e3 * comm, "gather_ms": 1e3 * gather,
                    "step_ms": 1e3 * (compute + comm + gather), "allreduce_calls": calls,
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
    """`lorafleet bench serve_tp ...`, `lorafleet bench serve --tensor-parallel-size N` (through
    bench.serve.tensor_parallel_args) and `python -m lorafleet.bench.serve_tp ...`."""
    from lorafleet.bench.doc_block import write_block, write_json
    from lorafleet.bench.workloads import make_random_llama, write_adapter_store
    from lorafleet.models.config import ModelConfig

    if args.from_json:
        reports = [json.loads(path.read_text()) for path in args.from_json]
        print(markdown(reports))
        if args.update_doc:
            write_block(args.update_doc, "serve_tp", markdown(reports))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, store = Path(tmp) / "model", Path(tmp) / "adapters"
        make_random_llama(model_dir, args.hidden, args.layers, args.heads, args.kv_heads,
                          args.vocab)
        config = ModelConfig.from_hf(model_dir)
        write_adapter_store(store, args.adapters, config, seed=0)
        names = sorted(p.name for p in store.iterdir())
        requests = workload(args, names)
        cores = os.cpu_count() or 1
        variants = [(1, t, "replicated")
                    for t in (args.single_threads or sorted({cores, 1}, reverse=True))]
        variants += [(n, max(1, cores // n), vocab) for n in args.sizes if n > 1
                     for vocab in args.vocab_modes]
        runs = []
        for repeat in range(args.repeats):
            for size, threads, vocab in variants:
                result = run_once(model_dir, store, size, threads, args, requests, vocab)
                result["repeat"] = repeat
                runs.append(result)
                print(json.dumps(result), flush=True)

    def key(size, threads, vocab):
        return f"{size}x{threads}" + (f" {vocab}" if size > 1 else "")

    best = {key(*v): max((r for r in runs if key(r["size"], r["torch_threads_per_rank"],
                                                r.get("vocab", "replicated")) == key(*v)),
                         key=lambda r: r["generated_tokens_per_s"]) for v in variants}
    estimates = {}
    for vocab in args.vocab_modes:
        measured = [r for r in best.values() if r.get("vocab") == vocab]
        per_layer = ((measured[0]["allreduce_per_step"] - (vocab == "sharded")) / args.layers
                     if measured else 2.0)
        estimates[vocab] = {f"decode_batch_{b}": a100_estimate(b, [1, 2, 4, 8], vocab=vocab,
                                                               allreduces_per_layer=per_layer)
                            for b in (32, 256)}
    report = {
        "benchmark": "serve_tp", "command": command(sys.argv),
        "machine": {"cpu_count": os.cpu_count(), "loadavg": os.getloadavg()},
        "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                  "kv_heads": args.kv_heads, "vocab": args.vocab,
                  "intermediate": config.intermediate_size},
        "workload": {"requests": args.requests, "prompt": args.prompt, "output": args.output,
                     "adapters": args.adapters},
        "runs": runs, "best (size x threads per rank, vocab)": best,
        "medians": medians(runs, key),
        "a100_estimate": {"model": LLAMA_7B, "hardware": A100, **estimates}}
    for name, r in best.items():
        line = (f"{name}: {r['generated_tokens_per_s']:.1f} tok/s, decode step "
                f"{r['decode_step_ms']:.1f} ms")
        if r["size"] > 1:
            line += (f", {r['allreduce_per_step']:.0f} all-reduces + "
                     f"{r['gather_per_step']:.2f} gathers/step "
                     f"({r['comm_wire_bytes_per_step'] / 1e3:.1f} KB on the wire/step, "
                     f"{r['comm_ms_per_step']:.2f} ms/step, "
                     f"{100 * r['comm_share_of_time']:.0f}% of the time), control "
                     f"{r['control_bytes_per_step']:.0f} B/step")
        print(line)
    if args.json:
        write_json(args.json, report, indent=1)
    if args.update_doc:
        write_block(args.update_doc, "serve_tp", markdown([report]))
    return 0


def command(argv: list[str]) -> str:
    """The command as a user types it: `lorafleet ...` for the CLI's entry points."""
    program = Path(argv[0]).name
    head = "lorafleet" if program in ("lorafleet", "__main__.py", "cli.py") else argv[0]
    return " ".join([head, *argv[1:]])


def markdown(reports: list[dict]) -> str:
    """Per result file: its command and load, one row per variant (median tokens/s with the
    best run in brackets, median decode step, the best run's collectives and volumes, median
    collective time); then the A100 estimate of the first file, per vocabulary mode."""
    lines = []
    for report in reports:
        load = report["machine"]["loadavg"][0]
        runs = len(report["runs"])
        lines += [f"`{command(report['command'].split())}` ({runs} runs, "
                  f"{report['machine']['cpu_count']} cores, load average {load:.1f} at the end):",
                  "",
                  "| run | generated tok/s, median (best) | decode step, median | collectives "
                  "per step | all-reduce bytes per token | logits gathered per step | "
                  "collective time per step, median |",
                  "|---|---|---|---|---|---|---|"]
        best = report["best (size x threads per rank, vocab)"]
        for name, med in report["medians"].items():
            top = best[name]
            if top["size"] == 1:
                label = (f"1 process, {top['torch_threads_per_rank']} thread"
                         f"{'s' if top['torch_threads_per_rank'] > 1 else ''}")
                comm = ["-", "-", "-", "-"]
            else:
                label = f"{top['size']} ranks, vocab {top['vocab']}"
                gathers = top["gather_per_step"]
                comm = [f"{top['allreduce_per_step']:.0f} all-reduces"
                        + (f" + {gathers:.0f} gather" if gathers else ""),
                        f"{top['allreduce_bytes_per_token']:,.0f}",
                        f"{top['gather_bytes_per_step'] / 1e6:.2f} MB" if gathers else "-",
                        f"{med['comm_ms_per_step']:.0f} ms"]
            lines.append(f"| {label} | {med['generated_tokens_per_s']:.0f} "
                         f"({top['generated_tokens_per_s']:.0f}) | "
                         f"{med['decode_step_ms']:.0f} ms | " + " | ".join(comm) + " |")
        lines.append("")
    estimate = reports[0]["a100_estimate"]
    modes = [m for m in VOCAB_MODES if m in estimate]
    lines += ["Paper estimate (`a100_estimate`: Llama-7B, bf16, A100-80GB, NVLink; decode step "
              "and speed-up over 1 GPU):", "",
              "| vocab | batch | 1 GPU | 2 GPUs | 4 GPUs | 8 GPUs |", "|---|---|---|---|---|---|"]
    for mode in modes:
        for batch, rows in estimate[mode].items():
            cells = [f"{r['step_ms']:.2f} ms" + (f" ({r['speedup_vs_1']:.2f}x)"
                                                 if r["ranks"] > 1 else "") for r in rows]
            lines.append(f"| {mode} | {batch.rsplit('_', 1)[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def medians(runs: list[dict], key) -> dict:
    """Per variant: the median tokens/s and decode step over the repeats (the shared machine's
    load moves single runs; the best and the median together show the spread)."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(key(r["size"], r["torch_threads_per_rank"],
                              r.get("vocab", "replicated")), []).append(r)
    return {name: {"generated_tokens_per_s": statistics.median(r["generated_tokens_per_s"]
                                                               for r in rs),
                   "decode_step_ms": statistics.median(r["decode_step_ms"] for r in rs),
                   **({"comm_ms_per_step": statistics.median(r["comm_ms_per_step"] for r in rs)}
                      if rs[0]["size"] > 1 else {}),
                   "runs": len(rs)}
            for name, rs in groups.items()}


if __name__ == "__main__":
    raise SystemExit(main())
