"""Sizing the engine from memory: one budget holds the base weights, their prepacked copies
(packed_linear.py) and the unified page pool (pool.py).

A page is one hidden-size vector, so a page count means a different amount of memory, and a
different number of KV tokens, for every model: 8,192 pages hold about 500 tokens of KV for a
Llama-3-8B and 32,000 for a 4-layer model of hidden 1024. So the engine is sized in bytes:

- `num_pages` given: that is the pool (an override; the budget is only checked, with a warning).
- `memory_budget` given, in bytes or as a fraction (<= 1.0) of the memory available when the
  engine starts (free RAM on CPU, free device memory on CUDA; vLLM's
  `--gpu-memory-utilization`): weights, packed copies and pool together stay within it, and the
  pool takes all the weights leave.
- neither: the pool holds what the running batch is expected to need: `DEFAULT_SEQ_TOKENS` of
  KV for each of `max_num_seqs` sequences (the model's context if shorter) plus one adapter of
  rank `DEFAULT_ADAPTER_RANK` on q, k, v, o per sequence; never more than
  `DEFAULT_MEMORY_FRACTION` of available memory in all, and a warning when that takes less.
  Pages the batch's KV leaves free hold more adapters: the pool is unified.

Prepacked weights (bf16 on CPU): the packed copy is as large as the plain weight. When the budget
holds both beside the pool the plain weights are kept (merging into them, saving and the other
fallbacks work as before); when it does not, the packed copy *replaces* the plain weight (same
bytes, same speed; packed_linear.py restores the plain layout on demand) and a tied output head,
whose plain weight the embedding still needs, is not packed. A model whose weights fit serves at
full speed either way (the same oneDNN op on the same packed tensor). Measured (docs/engine.md;
bf16 Llama, 631 MiB of weights, 566 MiB packable): RSS growth building the engine +1,453 MiB
with both copies, +852 MiB with the packed copies replacing the plain ones, +875 MiB unpacked.

Plain Python with no torch import (like pool.py); `available_memory` and the engine supply the
numbers.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass

from lorafleet.errors import ConfigError

log = logging.getLogger(__name__)

# Tokens of KV per running sequence the default pool holds: S-LoRA's workload draws input and
# output lengths uniformly in [8, 512] (sec. 7), so a sequence of both at their mean is ~512.
DEFAULT_SEQ_TOKENS = 512
# One adapter per running sequence (the worst case for distinct adapters in a batch) of this
# rank on q, k, v, o: PEFT users most often pick 8-16; larger ones take pages the KV leaves.
DEFAULT_ADAPTER_RANK = 16
# The default never takes more than this share of available memory: the rest is for what the
# budget does not count (activations, logits, the host copies of adapters, the tokenizer and the
# HTTP server, the allocator's slack). vLLM's default --gpu-memory-utilization is the same 0.9.
DEFAULT_MEMORY_FRACTION = 0.9

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_memory_size(value: str | int | float, field: str = "memory_budget") -> int | float:
    """Bytes (int) for a size such as `12GiB`, `512 MB`, `1e9`, `4096B`; a fraction of available
    memory (float in (0, 1]) for a bare number <= 1.0 such as `0.9`. ConfigError naming `field`
    for anything else."""
    if isinstance(value, bool):
        raise ConfigError(f"{field}: expected a size or a fraction, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ConfigError(f"{field}: cannot read {value!r} as a memory size; expected a "
                              "fraction of available memory (0.9) or a size (12GiB, 512MB, "
                              "4096B)")
        number, unit = float(match.group(1)), match.group(2).lower()
        if unit and unit not in UNITS:
            raise ConfigError(f"{field}: unknown unit {match.group(2)!r} in {value!r}; expected "
                              "B, KB, MB, GB, TB, KiB, MiB, GiB or TiB")
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{field}: must be positive, got {value!r}")
    if not unit and number <= 1.0:
        return number
    size = int(number * UNITS[unit or "b"])
    if size < 1:
        raise ConfigError(f"{field}: {value!r} is less than one byte")
    return size


def format_bytes(num_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{int(num_bytes)} B"


def available_memory(device: str = "cpu") -> int | None:
    """Bytes that can be allocated now: CUDA's free device memory, or on CPU the kernel's
    estimate of memory available without swapping (/proc/meminfo MemAvailable; free physical
    pages where there is no /proc). None when it cannot be known."""
    if str(device).startswith("cuda"):
        import torch      # only here: the planner itself is plain Python

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024        # the kernel reports kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def adapter_pages(num_layers: int, hidden: int, q_dim: int, kv_dim: int, rank: int) -> int:
    """Pages of a rank-`rank` adapter on q, k, v, o (pool.py: `r * (ceil(in/H) + ceil(out/H))`
    per module)."""
    def module(fan_in, fan_out):
        return rank * (-(-fan_in // hidden) + -(-fan_out // hidden))
    per_layer = (module(hidden, q_dim) + 2 * module(hidden, kv_dim) + module(q_dim, hidden))
    return num_layers * per_layer


@dataclass
class MemoryPlan:
    num_pages: int
    page_bytes: int
    wanted_pages: int                # what the default asks for (the running batch's need)
    weight_bytes: int                # base weights as loaded
    packable_bytes: int              # projection weights a packed copy would duplicate
    release_plain_weights: bool      # packed copies replace the plain weights (same bytes)
    available_bytes: int | None      # memory available at start (weights already loaded included)
    budget_bytes: int | None         # what weights + packed copies + pool may take
    source: str                      # "num_pages", "memory_budget" or "default"

    @property
    def pool_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def packed_bytes(self) -> int:
        """Extra bytes the packed copies take beside the plain weights."""
        return 0 if self.release_plain_weights else self.packable_bytes

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.packed_bytes + self.pool_bytes

    def summary(self, kv_tokens: int) -> str:
        budget = (f"budget {format_bytes(self.budget_bytes)}" if self.budget_bytes is not None
                  else "no budget (available memory unknown)")
        packed = ("no packed copies" if not self.packable_bytes else
                  "packed copies replace the plain weights" if self.release_plain_weights
                  else f"packed copies {format_bytes(self.packed_bytes)}")
        return (f"pool {self.num_pages} pages x {self.page_bytes} B = "
                f"{format_bytes(self.pool_bytes)} ({kv_tokens} tokens of KV if all KV; "
                f"sized by {self.source}); weights {format_bytes(self.weight_bytes)}, {packed}; "
                f"{budget} of {format_bytes(self.available_bytes or 0)} available")


def plan_memory(*, page_bytes: int, wanted_pages: int, min_pages: int, weight_bytes: int,
                packable_bytes: int, available_bytes: int | None,
                memory_budget: int | float | None = None,
                num_pages: int | None = None) -> MemoryPlan:
    """Split one budget between weights, packed copies and the pool (the policy in the module
    docstring). `min_pages`: below this the engine cannot run one sequence (ConfigError)."""
    if memory_budget is not None:
        memory_budget = parse_memory_size(memory_budget)
    if isinstance(memory_budget, float):
        if available_bytes is None:
            raise ConfigError(f"memory_budget {memory_budget} is a fraction of available "
                              "memory, which cannot be measured here; give a size (e.g. 12GiB)")
        budget = int(memory_budget * available_bytes)
    elif memory_budget is not None:
        budget = memory_budget
        if available_bytes is not None and budget > available_bytes:
            log.warning("memory_budget %s is more than the %s available", format_bytes(budget),
                        format_bytes(available_bytes))
    elif available_bytes is not None:
        budget = int(DEFAULT_MEMORY_FRACTION * available_bytes)
    else:
        budget = None
    source = ("num_pages" if num_pages is not None else
              "memory_budget" if memory_budget is not None else "default")

    def plan(pages, release):
        return MemoryPlan(pages, page_bytes, wanted_pages, weight_bytes, packable_bytes, release,
                          available_bytes, budget, source)

    if num_pages is not None:
        if num_pages < 1:
            raise ConfigError(f"num_pages must be positive, got {num_pages}")
        release = budget is not None and (
            weight_bytes + packable_bytes + num_pages * page_bytes > budget)
        result = plan(num_pages, release)
        if budget is not None and result.total_bytes > budget:
            log.warning("num_pages %d: weights and pool take %s, more than the budget of %s",
                        num_pages, format_bytes(result.total_bytes), format_bytes(budget))
        return result
    if budget is None:
        log.warning("available memory unknown: the pool is sized for the running batch "
                    "(%d pages) without a check", wanted_pages)
        return plan(wanted_pages, False)
    left = budget - weight_bytes                 # for the pool and the packed copies
    keep = left - packable_bytes >= wanted_pages * page_bytes
    pool_bytes = left - (packable_bytes if keep else 0)
    pages = pool_bytes // page_bytes if pool_bytes > 0 else 0
    if memory_budget is None:
        pages = min(pages, wanted_pages)
    if pages < min_pages:
        raise ConfigError(
            f"memory budget {format_bytes(budget)} leaves {format_bytes(max(left, 0))} after "
            f"the weights ({format_bytes(weight_bytes)}); the pool needs at least "
            f"{format_bytes(min_pages * page_bytes)} ({min_pages} pages) for one sequence. "
            "Raise memory_budget (--memory-budget / --gpu-memory-utilization), lower "
            "max_model_len, or quantize the base (--quantize nf4)")
    if pages < wanted_pages:
        log.warning("the pool gets %d pages (%s), less than the %d pages (%s) the running "
                    "batch is expected to need: the memory budget (%s) allows no more",
                    pages, format_bytes(pages * page_bytes), wanted_pages,
                    format_bytes(wanted_pages * page_bytes), format_bytes(budget))
    return plan(pages, not keep)


def weight_bytes(model) -> int:
    """Bytes of a model's parameters and buffers, each storage once (a tied head is counted with
    the embedding)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.device, tensor.data_ptr())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def plan_for_model(model, config, max_model_len: int, available_bytes: int | None) -> MemoryPlan:
    """The plan for an engine (`config`: an EngineConfig) over a loaded `model`, before the
    runner wraps and packs its projections."""
    from .kv_cache import KVLayout
    from .packed_linear import can_prepack

    cfg = model.config
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    layout = KVLayout(cfg.num_hidden_layers, kv_dim, cfg.hidden_size, config.block_tokens)
    seq_tokens = min(DEFAULT_SEQ_TOKENS, max_model_len)
    num_adapters = min(config.max_num_seqs, config.max_adapters_per_step or config.max_num_seqs)
    wanted = (config.max_num_seqs * layout.pages_for_tokens(seq_tokens) + num_adapters
              * adapter_pages(cfg.num_hidden_layers, cfg.hidden_size,
                              cfg.num_attention_heads * cfg.head_dim, kv_dim,
                              min(DEFAULT_ADAPTER_RANK, config.max_lora_rank)))
    packable = 0
    if config.prepack_weights:
        packable = sum(m.weight.numel() * m.weight.element_size()
                       for m in model.modules() if can_prepack(m))
    param = next(model.parameters())
    return plan_memory(page_bytes=cfg.hidden_size * param.element_size(), wanted_pages=wanted,
                       min_pages=layout.pages_for_tokens(seq_tokens),
                       weight_bytes=weight_bytes(model), packable_bytes=packable,
                       available_bytes=available_bytes, memory_budget=config.memory_budget,
                       num_pages=config.num_pages)


def kv_tokens(num_pages: int, layout) -> int:
    """Tokens of KV (all layers, K and V) that `num_pages` pages hold."""
    return num_pages // layout.pages_per_block * layout.block_tokens
