"""The model runner: the only part of the engine that turns requests into tensors.

It owns the pool tensor (`pages [num_pages, H]`, the contents of pool.py's pages: KV rows and
adapter weights) and the model, whose every projection it swaps for a `BatchedLoraLinear` shell
(module names unchanged, so PEFT keys still match). One `run` is one forward pass:

    tokens of all scheduled sequences flattened into B=1, T=sum of new tokens
    positions, page tables -> PagedAttention;  adapter per row -> LoraBatch
    model(input_ids, ForwardBatch(positions, attention, lora), logits_indices=last tokens)

Sequences are reordered so that those sharing an adapter are adjacent: each adapter's rows form
one segment for the batched LoRA operators.
"""
from __future__ import annotations

import torch
from torch import nn

from lorafleet.models import ForwardBatch, linear_layer_names

from .adapter_cache import AdapterCache
from .attention import PagedAttention, kv_view
from .kv_cache import KVCacheManager, KVLayout
from .lora_batch import LoraBatchBuilder
from .lora_ops import BatchedLoraLinear
from .sequence import Sequence


def wrap_projections(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Swap every projection (lm_head included: it is called through `project` too) for a
    BatchedLoraLinear. Returns module name -> (in_features, out_features). Idempotent."""
    targets = {}
    for name in linear_layer_names(model, include_lm_head=True):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if isinstance(parent, BatchedLoraLinear):
            continue                      # the base layer of a shell from an earlier call
        if not isinstance(module, BatchedLoraLinear):
            module = BatchedLoraLinear(module, name)
            setattr(parent, child, module)
        targets[name] = (module.in_features, module.out_features)
    return targets


class ModelRunner:
    def __init__(self, model: nn.Module, num_pages: int, block_tokens: int):
        self.model = model
        config = model.config
        self.param = next(model.parameters())
        self.dtype, self.device = self.param.dtype, self.param.device
        self.targets = wrap_projections(model)
        self.layout = KVLayout(config.num_hidden_layers,
                               config.num_key_value_heads * config.head_dim,
                               config.hidden_size, block_tokens)
        self.pages = torch.zeros(num_pages, config.hidden_size, dtype=self.dtype,
                                 device=self.device)
        self.kv = kv_view(self.pages, self.layout)
        self._lora_builder: LoraBatchBuilder | None = None

    @property
    def page_bytes(self) -> int:
        return self.pages.shape[1] * self.pages.element_size()

    def write_pages(self, page_ids: list[int], pages: torch.Tensor) -> None:
        """Copy host pages into the pool (adapter loads)."""
        index = torch.tensor(page_ids, device=self.device)
        # index_copy_ rather than `pages[index] = ...` (a slow generic index_put on CPU).
        self.pages.index_copy_(0, index, pages.to(device=self.device, dtype=self.dtype,
                                                  non_blocking=True))

    def attach(self, cache: AdapterCache) -> None:
        self._lora_builder = LoraBatchBuilder(self.pages, cache)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool,
            kv: KVCacheManager) -> tuple[list[Sequence], torch.Tensor]:
        """One forward pass. Returns the sequences in the order used and their next-token logits
        [len(seqs), vocab] (float32)."""
        seqs = sorted(seqs, key=lambda s: (s.adapter is not None, s.adapter or ""))
        lens = [s.num_tokens for s in seqs]
        if is_prefill:
            ids = [t for s in seqs for t in s.token_ids]
            positions = [p for n in lens for p in range(n)]
            rows = lens
        else:
            ids = [s.token_ids[-1] for s in seqs]
            positions = [n - 1 for n in lens]
            rows = [1] * len(seqs)
        last = torch.tensor(lens if is_prefill else rows, device=self.device).cumsum(0) - 1
        attention = PagedAttention(self.kv, self.layout, lens, is_prefill,
                                   [kv.page_ids(s.request_id) for s in seqs])
        runs: list[tuple[str | None, int]] = []
        for seq, n in zip(seqs, rows):
            if runs and runs[-1][0] == seq.adapter:
                runs[-1] = (seq.adapter, runs[-1][1] + n)
            else:
                runs.append((seq.adapter, n))
        lora = self._lora_builder.build(runs) if self._lora_builder else None
        batch = ForwardBatch(positions=torch.tensor([positions], device=self.device),
                             attention=attention, lora=lora)
        input_ids = torch.tensor([ids], device=self.device)
        logits = self.model(input_ids, batch, logits_indices=last)   # [1, N, V]
        return seqs, logits[0].float()
