"""One run of the serving benchmark, in its own process (`python -m lorafleet.bench.serve_run
SPEC.json RESULT.json`), so that its peak RSS is its own and no run inherits another's caches.

A spec names the system ("lorafleet", "base-only", "merge-swap", "peft"), the model and adapter
store folders, the number of adapters N, the trace (make_requests' arguments), the engine
configuration (`engine`: EngineConfig fields; empty = the out-of-the-box defaults), the machine's
roofline (bandwidth, matmul rate) and the SLO bound. The result is the trace's summary
(trace.summarize) plus registration time, memory, adapter-cache counters and the roofline ratios.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from lorafleet.errors import ConfigError

from .serve_baselines import run_merge_swap, run_peft
from .serve_engine import adapter_counters, describe_engine, engine_config, register
from .trace import drive, peak_rss_bytes, rss_bytes, summarize
from .workloads import adapter_pool_pages, adapter_spec, distinct_adapters, make_requests


def trace_for(spec: dict) -> list[dict]:
    t = spec["trace"]
    n = 0 if spec["system"] == "base-only" else spec["num_adapters"]
    return make_requests(t["requests"], spec["rate"], n, t["alpha"], tuple(t["input_len"]),
                         tuple(t["output_len"]), t["vocab"], t["seed"],
                         spec.get("popularity") or "power-law")


def step_roofline(engine, step_log, bandwidth: float, flops: float, adapter_bytes) -> dict:
    """Each step's floor max(bytes / bandwidth, FLOPs / matmul rate) (DESIGN.md sec. 4): bytes
    = weights + KV read + the step's distinct adapters; FLOPs = 2 * parameters * tokens. Mean
    decode step and its ratio, and the ratio of all steps' time to all steps' floors."""
    model = engine.model
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    elem = next(model.parameters()).element_size()
    layout = engine.kv.layout
    decode_ratios, decode_times, floors = [], [], 0.0
    for rec in step_log:
        kv_bytes = rec.context_tokens * layout.num_layers * 2 * layout.kv_dim * elem
        lora_bytes = sum(adapter_bytes(a) for a in rec.adapters)
        floor = max((params * elem + kv_bytes + lora_bytes) / bandwidth,
                    2 * params * rec.num_tokens / flops)
        floors += floor
        if not rec.is_prefill:
            decode_ratios.append(rec.seconds / floor)
            decode_times.append(rec.seconds)
    if not step_log:
        return {}
    out = {"steps": len(step_log),
           "steps_vs_roofline": sum(r.seconds for r in step_log) / floors}
    if decode_times:
        out.update(decode_step_ms=1e3 * statistics.fmean(decode_times),
                   decode_batch=statistics.fmean(r.num_seqs for r in step_log
                                                 if not r.is_prefill),
                   decode_adapters=statistics.fmean(len(r.adapters) for r in step_log
                                                    if not r.is_prefill),
                   decode_vs_roofline=statistics.fmean(decode_ratios))
    return out


def run_lorafleet(spec: dict, requests: list[dict]) -> dict:
    import torch

    from lorafleet.serve import Engine

    rss_start = rss_bytes()
    started = time.perf_counter()
    engine = Engine(spec["model_dir"], config=engine_config(spec.get("engine") or {}))
    load_s = time.perf_counter() - started
    rss_engine = rss_bytes()
    names, mode, register_s = None, None, 0.0
    if spec["system"] != "base-only":
        started = time.perf_counter()
        names, mode = register(engine, Path(spec["store_dir"]), spec["num_adapters"])
        register_s = time.perf_counter() - started
    rss_registered = rss_bytes()
    engine.step_log = []
    with torch.inference_mode():
        timings = drive(engine, requests, names)
    result = summarize(requests, timings, spec.get("slo_ttft_s"))
    stats = engine.stats()
    page_bytes, seed, model_config = engine.runner.page_bytes, spec["trace"]["seed"], \
        engine.model.config
    ranks = tuple(spec.get("ranks") or ()) or None

    def adapter_bytes(name):
        rank, targets = adapter_spec(int(name.removeprefix("adapter")), seed,
                                     *((ranks,) if ranks else ()))
        targets = spec.get("targets") or targets
        return adapter_pool_pages(model_config, rank, targets) * page_bytes

    result.update(step_roofline(engine, engine.step_log, spec["bandwidth"], spec["flops"],
                                adapter_bytes))
    result.update(adapter_counters(stats), engine=describe_engine(engine), engine_stats=stats,
                  register_mode=mode, register_s=register_s, model_load_s=load_s,
                  rss_start_bytes=rss_start, rss_engine_bytes=rss_engine,
                  rss_registered_bytes=rss_registered, rss_end_bytes=rss_bytes())
    return result


def run(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    requests = trace_for(spec)
    if spec["system"] in ("lorafleet", "base-only"):
        result = run_lorafleet(spec, requests)
    elif spec["system"] == "merge-swap":
        result = run_merge_swap(spec, requests)
    elif spec["system"] == "peft":
        result = run_peft(spec, requests)
    else:
        raise ConfigError(f"unknown system {spec['system']!r}")
    result["distinct_adapters"] = distinct_adapters(requests)
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["threads"] = torch.get_num_threads()
    return result


def main(argv: list[str]) -> int:
    spec_file, result_file = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_file.read_text())
    result_file.write_text(json.dumps(run(spec), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
