"""The S-LoRA workload (sec. 7) for `lorafleet bench serve`: a random Llama, a store of random
PEFT adapter folders on disk, and traces of requests with Poisson arrivals and power-law or
uniform adapter popularity.

Traces are built from three independent random streams (lengths and prompts, arrival gaps,
adapter choice), so two traces that differ only in the rate, the number of adapters or the
popularity carry the same prompts and output lengths: runs differ only in what is measured.
"""
from __future__ import annotations

import math
import os
import random
from pathlib import Path

from lorafleet.errors import ConfigError

POPULARITIES = ("power-law", "uniform")
# Ranks 8-64, small ones the most common (most fine-tunes use r=8-16); a quarter of the adapters
# adapt every linear layer (QLoRA's recipe), the rest q, k, v, o.
RANKS = (8, 16, 32, 64)
RANK_WEIGHTS = (0.4, 0.3, 0.2, 0.1)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = ATTENTION + ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR_SHARE = 0.25


# ---- the base model -------------------------------------------------------------------------

def make_random_llama(path: Path, hidden: int, layers: int, heads: int, kv_heads: int,
                      vocab: int, dtype: str = "bfloat16") -> None:
    """A random-weight Llama (GQA) saved as a Hugging Face folder declaring `dtype` (as a
    released bf16 checkpoint does, so the engine's dtype "auto" sees what it would in use)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(path)


# ---- adapters ---------------------------------------------------------------------------------

def adapter_name(index: int) -> str:
    return f"adapter{index:05d}"


def adapter_spec(index: int, seed: int, ranks=RANKS, rank_weights=RANK_WEIGHTS,
                 all_linear_share: float = ALL_LINEAR_SHARE) -> tuple[int, tuple[str, ...]]:
    """(rank, target modules) of adapter `index`, a pure function of (seed, index)."""
    rng = random.Random(seed * 1_000_003 + index)
    rank = rng.choices(ranks, rank_weights[:len(ranks)] if len(rank_weights) >= len(ranks)
                       else None)[0]
    return rank, ALL_LINEAR if rng.random() < all_linear_share else ATTENTION


def module_shapes(model_config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each Llama projection."""
    hidden, inter = model_config.hidden_size, model_config.intermediate_size
    q = model_config.num_attention_heads * model_config.head_dim
    kv = model_config.num_key_value_heads * model_config.head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (q, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden)}


def adapter_pool_pages(model_config, rank: int, targets) -> int:
    """Pages the engine's pool gives this adapter: per module r rows of A and r of B^T, each
    row padded to whole pages of hidden_size numbers (serve/adapter_cache.py)."""
    shapes, page = module_shapes(model_config), model_config.hidden_size
    per_layer = sum(rank * (math.ceil(shapes[t][0] / page) + math.ceil(shapes[t][1] / page))
                    for t in targets)
    return per_layer * model_config.num_hidden_layers


def make_adapter(index: int, model_config, seed: int, ranks=RANKS, dtype: str = "bfloat16",
                 targets=None):
    """(adapter_config dict, PEFT-keyed tensors) with random A and B: a valid PEFT LoRA.
    `targets` overrides the spec's target modules (the q,k,v,o-only workload)."""
    import torch

    rank, spec_targets = adapter_spec(index, seed, ranks)
    targets = tuple(targets or spec_targets)
    gen = torch.Generator().manual_seed(seed * 100_003 + index)
    shapes = module_shapes(model_config)
    tensors = {}
    for layer in range(model_config.num_hidden_layers):
        for target in targets:
            block = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{block}.{target}"
            in_features, out_features = shapes[target]
            # B random (not PEFT's zero init) so every adapter changes the output.
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, in_features, generator=gen)
                                               * 0.02).to(getattr(torch, dtype))
            tensors[f"{key}.lora_B.weight"] = (torch.randn(out_features, rank, generator=gen)
                                               * 0.02).to(getattr(torch, dtype))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "rank_pattern": {},
              "alpha_pattern": {}, "modules_to_save": None, "inference_mode": True,
              "base_model_name_or_path": "random-llama"}
    return config, tensors


def write_adapter_store(root: Path, count: int, model_config, seed: int, ranks=RANKS,
                        targets=None) -> dict:
    """`count` PEFT folders under `root` (adapter00000, ...); returns their sizes on disk."""
    from lorafleet.lora.peft_format import write_adapter

    root.mkdir(parents=True, exist_ok=True)
    sizes = []
    for index in range(count):
        folder = write_adapter(root / adapter_name(index),
                               *make_adapter(index, model_config, seed, ranks, targets=targets))
        sizes.append(sum(f.stat().st_size for f in folder.iterdir()))
    return folder_sizes(sizes)


def folder_sizes(sizes: list[int]) -> dict:
    return {"count": len(sizes), "total_bytes": sum(sizes), "mean_bytes": sum(sizes) / len(sizes),
            "min_bytes": min(sizes), "max_bytes": max(sizes)}


def link_store(source: Path, target: Path, names: list[str]) -> Path:
    """A store holding `names` of `source` as hard links (no copy: same page cache)."""
    for name in names:
        (target / name).mkdir(parents=True, exist_ok=True)
        for f in (source / name).iterdir():
            link = target / name / f.name
            if not link.exists():
                os.link(f, link)
    return target


# ---- traces -----------------------------------------------------------------------------------

def make_requests(n: int, rate: float, num_adapters: int, alpha: float, input_len, output_len,
                  vocab: int, seed: int, popularity: str = "power-law") -> list[dict]:
    """n requests: Poisson arrivals at `rate`/s, prompt and output lengths uniform in the given
    (low, high) ranges, adapter index by `popularity` ("power-law": p_i ~ (i + 1)^-alpha, as
    S-LoRA; "uniform") or None for every request when num_adapters == 0."""
    if popularity not in POPULARITIES:
        raise ConfigError(f"popularity must be one of {POPULARITIES}, got {popularity!r}")
    lengths = random.Random(seed)
    gaps = random.Random(seed + 1)
    choice = random.Random(seed + 2)
    weights = [(i + 1) ** -alpha for i in range(max(num_adapters, 1))]
    t, requests = 0.0, []
    for i in range(n):
        t += gaps.expovariate(1.0) / rate
        if not num_adapters:
            adapter = None
        elif popularity == "uniform":
            adapter = choice.randrange(num_adapters)
        else:
            adapter = choice.choices(range(num_adapters), weights)[0]
        requests.append({
            "id": f"req{i}", "arrival": t,
            "prompt": [lengths.randrange(4, vocab) for _ in range(lengths.randint(*input_len))],
            "output_len": lengths.randint(*output_len), "adapter": adapter})
    return requests


def distinct_adapters(requests: list[dict]) -> int:
    return len({r["adapter"] for r in requests if r["adapter"] is not None})
