"""The ways people serve many adapters today, on the benchmark's trace (one per process, from
serve_run.py):

- merge-and-swap: one adapter at a time merged into the base weights (W += s B A) of the same
  engine serving without LoRA; switching (restore, merge) waits for the running batch to drain,
  as a single-model server must.
- PEFT + transformers: static batches of up to `max_num_seqs` requests in arrival order, each
  row with its own adapter (`generate(..., adapter_names=[...])`, PEFT's mixed-batch inference),
  left-padded; no continuous batching. A logits processor timestamps each generation step, so
  first-token and inter-token latencies are measured, not inferred.
"""
from __future__ import annotations

import time
from pathlib import Path

from .serve_engine import describe_engine, engine_config
from .trace import drive, summarize
from .workloads import adapter_name


def _read_adapters(store_dir: Path, indices) -> dict:
    from lorafleet.lora.peft_format import read_adapter

    return {i: read_adapter(store_dir / adapter_name(i)) for i in sorted(indices)}


def run_merge_swap(spec: dict, requests: list[dict]) -> dict:
    import torch

    from lorafleet.serve import Engine

    engine = Engine(spec["model_dir"], config=engine_config(spec.get("engine") or {}))
    adapters = _read_adapters(Path(spec["store_dir"]),
                              {r["adapter"] for r in requests if r["adapter"] is not None})
    modules = dict(engine.model.named_modules())
    state = {"current": None, "saved": {}, "swaps": 0}

    def swap_to(index):
        for name, weight in state["saved"].items():
            modules[name].base_layer.weight.copy_(weight)
        state["saved"] = {}
        config, tensors = adapters[index]
        scaling = config["lora_alpha"] / config["r"]
        for key, a in tensors.items():
            if not key.endswith("lora_A.weight"):
                continue
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            b = tensors[key.replace("lora_A", "lora_B")]
            weight = modules[module].base_layer.weight
            state["saved"][module] = weight.clone()
            weight.add_((scaling * (b.float() @ a.float())).to(weight.dtype))
        state["current"] = index
        state["swaps"] += 1

    def before_admit(r):
        if r["adapter"] == state["current"]:
            return True
        if engine.has_work():
            return False               # drain the running batch before swapping
        swap_to(r["adapter"])
        return True

    with torch.inference_mode():
        # Requests run as base-model rows: the merged weights carry the adapter.
        timings = drive(engine, requests, None, before_admit=before_admit)
    result = summarize(requests, timings, spec.get("slo_ttft_s"))
    result.update(swaps=state["swaps"], engine=describe_engine(engine))
    return result


def run_peft(spec: dict, requests: list[dict]) -> dict:
    import torch
    import transformers
    from peft import PeftModel

    from lorafleet.models import parse_dtype

    dtype = parse_dtype(spec.get("peft_dtype", "bfloat16"))
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model_dir"],
                                                              dtype=dtype).eval()
    store = Path(spec["store_dir"])
    used = sorted({r["adapter"] for r in requests if r["adapter"] is not None})
    started = time.perf_counter()
    peft_model = PeftModel.from_pretrained(model, store / adapter_name(used[0]),
                                           adapter_name=adapter_name(used[0]))
    for i in used[1:]:
        peft_model.load_adapter(store / adapter_name(i), adapter_name=adapter_name(i))
    register_s = time.perf_counter() - started
    peft_model.eval()
    step_times: list[float] = []

    class Stamp(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            step_times.append(time.perf_counter())
            return scores

    first, done, gaps, start = {}, {}, [], time.perf_counter()
    batch_size = spec.get("engine", {}).get("max_num_seqs", 64)
    cpu_start = time.process_time()
    for b in range(0, len(requests), batch_size):
        batch = requests[b:b + batch_size]
        wait = batch[-1]["arrival"] - (time.perf_counter() - start)
        if wait > 0:
            time.sleep(wait)
        width = max(len(r["prompt"]) for r in batch)
        ids = torch.tensor([[0] * (width - len(r["prompt"])) + r["prompt"] for r in batch])
        mask = torch.tensor([[0] * (width - len(r["prompt"])) + [1] * len(r["prompt"])
                             for r in batch])
        step_times.clear()
        with torch.inference_mode():
            peft_model.generate(input_ids=ids, attention_mask=mask,
                                adapter_names=[adapter_name(r["adapter"]) for r in batch],
                                max_new_tokens=max(r["output_len"] for r in batch),
                                min_new_tokens=max(r["output_len"] for r in batch),
                                do_sample=False, pad_token_id=0, eos_token_id=None,
                                logits_processor=transformers.LogitsProcessorList([Stamp()]))
        end = time.perf_counter() - start
        stamps = [t - start for t in step_times]
        for r in batch:
            # Token k of a row is sampled at step k; a row stops counting at its output_len
            # (the batch runs to its longest row: the static batch's cost).
            mine = stamps[:r["output_len"]]
            first[r["id"]] = mine[0]
            gaps += [b_ - a_ for a_, b_ in zip(mine, mine[1:])]
            done[r["id"]] = end
    timings = {"first": first, "done": done, "gaps": gaps, "errors": {},
               "elapsed": time.perf_counter() - start,
               "cpu_seconds": time.process_time() - cpu_start}
    result = summarize(requests, timings, spec.get("slo_ttft_s"))
    result.update(register_s=register_s, peft_adapters=len(used), peft_dtype=str(dtype))
    return result
