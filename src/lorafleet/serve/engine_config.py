"""`EngineConfig`: everything an `Engine` is built with (pool sizing, batching, adapters'
limits and tiers, dtype and device, tensor parallelism, quantization), checked on construction.
`lorafleet serve` builds its engine flags from these fields (cli/serve.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafleet.errors import ConfigError
from lorafleet.models.dtype import parse_dtype

from .memory import parse_memory_size

# EngineConfig.tensor_parallel_vocab: how the embedding and lm_head are split (shard.py)
VOCAB_MODES = ("replicated", "lm_head", "sharded")


def check_vocab_mode(vocab: str) -> None:
    if vocab not in VOCAB_MODES:
        raise ConfigError(f"tensor_parallel_vocab must be one of {', '.join(VOCAB_MODES)}, "
                          f"got {vocab!r}")


@dataclass
class EngineConfig:
    # Memory for weights + packed copies + page pool: bytes (or "12GiB"), or a fraction (<= 1.0)
    # of the memory available at start. None: the pool holds the running batch's KV and
    # adapters, within memory.DEFAULT_MEMORY_FRACTION of available memory (memory.py).
    memory_budget: int | float | str | None = None
    num_pages: int | None = None       # override: pool size in pages of hidden_size numbers each
    block_tokens: int = 16             # KV tokens added per allocation (kv_cache.py)
    max_num_seqs: int = 64             # running batch size cap
    max_num_batched_tokens: int = 2048 # tokens per step: decode rows + prefill chunks
    max_lora_rank: int = 64
    max_adapters_per_step: int | None = None
    first_token_deadline_s: float | None = None
    max_model_len: int | None = None   # default: the model's max_position_embeddings
    # auto: bf16 where the device computes it (a CPU with bf16 instructions, a GPU that has
    # it), else the checkpoint's 16-bit dtype where computed, else float32 (models/dtype.py).
    dtype: str | torch.dtype = "auto"
    device: str = "cpu"
    # Steps mix decode rows with prefill chunks, long prompts over several steps (scheduler.py);
    # False: a step is all prefill or all decode.
    enable_chunked_prefill: bool = True
    # bf16 on CPU: base projections held in oneDNN's packed layout (packed_linear.py): faster
    # decode matmuls; beside the plain weights when the memory budget allows, else instead.
    prepack_weights: bool = True
    # Host tier of adapters (adapter_loader.py): page copies kept in memory after they enter the
    # pool, LRU, at most this many (vLLM's max_cpu_loras) and bytes. None: no host cache (an
    # evicted adapter is read from disk again; docs/engine.md measures what the cache saves).
    max_cpu_loras: int | None = None
    max_cpu_lora_bytes: int | None = None
    # Adapter reads on the loader thread while steps run (S-LoRA sec. 5.2). False: read in the
    # step that needs them (deterministic scheduling for tests and debugging; steps stall).
    async_adapter_loading: bool = True
    # Tensor parallelism (parallel.py, shard.py): the model split over this many processes on
    # this machine (gloo on CPU; NCCL on CUDA, rank r on cuda:r), this one rank 0; a collective
    # waits at most the timeout. vocab: embedding and lm_head "replicated", or split by
    # vocabulary: "lm_head" only, or "sharded" (both) (shard.py). "lm_head": the fastest of
    # the three measured (docs/results/serve-tp-vocab.json, docs/engine.md); "sharded" saves
    # (N-1)/N of the embedding's memory per rank for one more all-reduce per step.
    tensor_parallel_size: int = 1
    tensor_parallel_timeout_s: float = 60.0
    tensor_parallel_vocab: str = "lm_head"
    # "nf4": load a checkpoint folder with its linears in NF4 (QLoRA); under tensor
    # parallelism each rank quantizes its own shard. None: as the checkpoint/model is.
    quantize: str | None = None

    def __post_init__(self):
        self.dtype = parse_dtype(self.dtype, "dtype")
        if self.memory_budget is not None:
            self.memory_budget = parse_memory_size(self.memory_budget, "memory_budget")
        check_vocab_mode(self.tensor_parallel_vocab)
        if self.quantize not in (None, "nf4"):
            raise ConfigError(f"quantize must be 'nf4' or None, got {self.quantize!r}")
        for name in ("block_tokens", "max_num_seqs", "max_num_batched_tokens",
                     "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
