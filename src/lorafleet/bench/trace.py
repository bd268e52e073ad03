"""Replaying a trace against an engine in real time, and what one replay measured.

Per request: arrival, first token, every later token, end. From those: throughput, time to first
token (TTFT) and inter-token latency (ITL) percentiles, and SLO attainment (the share of requests
whose first token came within a stated bound, counted over every request of the trace: a request
that failed or never produced a token misses it).
"""
from __future__ import annotations

import statistics
import time


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def drive(engine, requests: list[dict], names: list | None, before_admit=None) -> dict:
    """Replay arrivals in real time against `engine` (add_request / has_work / step); returns
    per-request timings, seconds since the start: {"first", "done", "gaps", "errors",
    "elapsed", "cpu_seconds"}. `names[i]` is adapter index i's name (None: no adapter).
    `before_admit(request)` may hold a request back (merge-and-swap drains the batch first)."""
    from lorafleet.serve import SamplingParams

    queue = sorted(requests, key=lambda r: r["arrival"])
    first, done, last, gaps, errors = {}, {}, {}, [], {}
    start, cpu_start = time.perf_counter(), time.process_time()
    position = 0
    while position < len(queue) or engine.has_work():
        now = time.perf_counter() - start
        while position < len(queue) and queue[position]["arrival"] <= now:
            r = queue[position]
            if before_admit is not None and not before_admit(r):
                break
            adapter = None if r["adapter"] is None or names is None else names[r["adapter"]]
            engine.add_request(r["id"], r["prompt"], adapter,
                               SamplingParams(max_tokens=r["output_len"], ignore_eos=True))
            position += 1
        if not engine.has_work():
            if position < len(queue):
                time.sleep(max(0.0, queue[position]["arrival"] - (time.perf_counter() - start)))
            continue
        for out in engine.step():
            t = time.perf_counter() - start
            if out.new_token_ids:
                if out.request_id in last:
                    # One step usually brings one token; several share the gap evenly.
                    gaps += [(t - last[out.request_id]) / len(out.new_token_ids)] * \
                        len(out.new_token_ids)
                first.setdefault(out.request_id, t)
                last[out.request_id] = t
            if out.finished:
                done[out.request_id] = t
                if out.error:
                    errors[out.request_id] = out.error
    return {"first": first, "done": done, "gaps": gaps, "errors": errors,
            "elapsed": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start}


def summarize(requests: list[dict], timings: dict, slo_ttft_s: float | None = None) -> dict:
    """Throughput, latency percentiles and SLO attainment of one replay (see `drive`)."""
    by_id = {r["id"]: r for r in requests}
    first, done, errors, elapsed = (timings["first"], timings["done"], timings["errors"],
                                    timings["elapsed"])
    ok = [i for i in done if i not in errors]
    latencies = [done[i] - by_id[i]["arrival"] for i in ok]
    ttft = [first[i] - by_id[i]["arrival"] for i in first]
    tokens = sum(by_id[i]["output_len"] for i in ok)
    result = {
        "requests": len(ok), "failed": len(requests) - len(ok), "seconds": elapsed,
        "tokens": tokens, "tokens_per_s": tokens / elapsed, "requests_per_s": len(ok) / elapsed,
        "mean_latency_s": statistics.fmean(latencies) if latencies else None,
        "p99_latency_s": percentile(latencies, 99),
        "mean_ttft_s": statistics.fmean(ttft) if ttft else None,
        "p50_ttft_s": percentile(ttft, 50), "p99_ttft_s": percentile(ttft, 99),
        "p50_itl_s": percentile(timings["gaps"], 50), "p99_itl_s": percentile(timings["gaps"], 99),
        "first_errors": sorted(set(errors.values()))[:3],
    }
    if slo_ttft_s is not None:
        met = sum(1 for i in first if i not in errors and
                  first[i] - by_id[i]["arrival"] <= slo_ttft_s)
        result.update(slo_ttft_s=slo_ttft_s, slo_attainment=met / len(requests))
    if "cpu_seconds" in timings:
        # CPU seconds of this process: less sensitive than wall time to other jobs on a shared
        # machine (all threads counted: compare runs with the same thread count).
        result["cpu_seconds"] = timings["cpu_seconds"]
        result["tokens_per_cpu_s"] = tokens / timings["cpu_seconds"]
    return result


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far: VmHWM of /proc/self/status (ru_maxrss is
    no good here: Linux carries the parent's peak across fork + exec into a child's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def rss_bytes() -> int:
    """This process's resident set size now."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
