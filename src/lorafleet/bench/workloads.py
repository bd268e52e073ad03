"""The S-LoRA workload (sec. 7) for `lorafleet bench serve`: requests with Poisson arrivals and
power-law adapter popularity, random in-memory PEFT adapters of mixed ranks, and the driver that
replays the arrivals in real time against an engine and summarises per-request timings."""
from __future__ import annotations

import random
import statistics
import time


# ---- the workload -------------------------------------------------------------------------

def make_requests(n: int, rate: float, num_adapters: int, alpha: float, input_len, output_len,
                  vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    weights = [(i + 1) ** -alpha for i in range(max(num_adapters, 1))]
    t, requests = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        requests.append({
            "id": f"req{i}", "arrival": t,
            "prompt": [rng.randrange(4, vocab) for _ in range(rng.randint(*input_len))],
            "output_len": rng.randint(*output_len),
            "adapter": rng.choices(range(len(weights)), weights)[0] if num_adapters else None})
    return requests


def make_adapter(index: int, model_config, ranks: list[int], seed: int):
    """(adapter_config dict, PEFT-keyed tensors) with random A and B, in memory."""
    import torch

    gen = torch.Generator().manual_seed(seed * 100_003 + index)
    rank = ranks[index % len(ranks)]
    targets = ["q_proj", "v_proj"] if index % 4 else ["q_proj", "k_proj", "v_proj", "o_proj"]
    hidden, kv = model_config.hidden_size, model_config.num_key_value_heads * \
        model_config.head_dim
    out_dim = {"q_proj": hidden, "k_proj": kv, "v_proj": kv, "o_proj": hidden}
    tensors = {}
    for layer in range(model_config.num_hidden_layers):
        for target in targets:
            key = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_dim[target], rank,
                                                          generator=gen) * 0.02
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": targets}
    return config, tensors


# ---- replaying it against an engine ----------------------------------------------------------

def drive(engine, requests: list[dict], names: list[str], before_admit=None) -> dict:
    """Replay arrivals in real time against `engine`; per-request timings."""
    from lorafleet.serve import SamplingParams

    pending = sorted(requests, key=lambda r: r["arrival"])
    first, done, start, cpu_start = {}, {}, time.perf_counter(), time.process_time()
    queue = list(pending)
    while queue or engine.has_work():
        now = time.perf_counter() - start
        while queue and queue[0]["arrival"] <= now:
            r = queue.pop(0)
            if before_admit is None or before_admit(r):
                engine.add_request(r["id"], r["prompt"],
                                   None if r["adapter"] is None else names[r["adapter"]],
                                   SamplingParams(max_tokens=r["output_len"], ignore_eos=True))
            else:
                queue.insert(0, r)
                break
        if not engine.has_work():
            if queue:
                time.sleep(max(0.0, queue[0]["arrival"] - (time.perf_counter() - start)))
            continue
        for out in engine.step():
            t = time.perf_counter() - start
            if out.new_token_ids:
                first.setdefault(out.request_id, t)
            if out.finished:
                done[out.request_id] = t
    result = summarize(requests, first, done, time.perf_counter() - start)
    # CPU seconds of this process over the run: less sensitive than wall time to other jobs
    # on a shared machine (all threads counted: compare runs with the same --threads).
    result["cpu_seconds"] = time.process_time() - cpu_start
    result["tokens_per_cpu_s"] = result["tokens"] / result["cpu_seconds"]
    return result


def summarize(requests, first, done, elapsed) -> dict:
    by_id = {r["id"]: r for r in requests}
    latencies = sorted(done[i] - by_id[i]["arrival"] for i in done)
    ttft = [first[i] - by_id[i]["arrival"] for i in first]
    tokens = sum(by_id[i]["output_len"] for i in done)
    return {"requests": len(done), "seconds": elapsed, "tokens": tokens,
            "tokens_per_s": tokens / elapsed,
            "requests_per_s": len(done) / elapsed,
            "mean_latency_s": statistics.fmean(latencies),
            "p99_latency_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "mean_ttft_s": statistics.fmean(ttft)}
