"""The model runner: the only part of the engine that turns requests into tensors.

It owns the pool tensor (`pages [num_pages, H]`, the contents of pool.py's pages: KV rows and
adapter weights) and the model, whose every projection it swaps for a `BatchedLoraLinear` shell
(module names unchanged, so PEFT keys still match). One `run` is one forward pass:

    new tokens of all scheduled sequences (decode rows, prompt chunks) flattened: B=1, T=sum
    positions, query/context lengths, page tables -> PagedAttention;  adapter per row -> LoraBatch
    model(input_ids, ForwardBatch(positions, attention, lora), logits_indices=sampling rows)

Logits are computed only for the sequences whose last token runs this step (a decode row, or
the last chunk of a prompt): the others have nothing to sample yet.

Sequences are reordered so that those sharing an adapter are adjacent: each adapter's rows form
one segment for the batched LoRA operators.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lorafleet.models import ForwardBatch
from lorafleet.models.modules import linear_layer_names, replace_submodule

from .adapter_cache import AdapterCache
from .attention import PagedAttention, kv_view
from .kv_cache import KVCacheManager, KVLayout
from .lora_batch import LoraBatchBuilder
from .lora_ops import BatchedLoraLinear
from .packed_linear import prepack_projections
from .sequence import Sequence


def wrap_projections(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Swap every projection (models.modules.is_projection: nn.Linear, GPT-2 Conv1D, a 4-bit
    Linear4bit of a QLoRA base; lm_head included: it is called through `project` too) for a
    BatchedLoraLinear. Returns module name -> (in_features, out_features). Idempotent: a shell
    from an earlier call stands for its base layer."""
    targets = {}
    candidates = ((name, module.base_layer if isinstance(module, BatchedLoraLinear) else module)
                  for name, module in model.named_modules())
    for name in linear_layer_names(model, include_lm_head=True, modules=candidates):
        module = model.get_submodule(name)
        if name.endswith(".base_layer") and isinstance(
                model.get_submodule(name.rpartition(".")[0]), BatchedLoraLinear):
            continue                      # inside a shell: the shell's own name is listed
        if not isinstance(module, BatchedLoraLinear):
            module = BatchedLoraLinear(module, name)
            replace_submodule(model, name, module)
        targets[name] = (module.in_features, module.out_features)
    return targets


@dataclass
class StepInputs:
    """One step's forward inputs as plain lists (picklable, a few KB)."""
    ids: list[int]                       # new tokens, flattened in row order
    positions: list[int]
    query_lens: list[int]
    context_lens: list[int]
    page_tables: list[list[int]]
    runs: list[tuple[str | None, int]]   # (adapter, rows) for consecutive row ranges
    logits_indices: list[int]            # rows whose logits are computed (empty: none)


class ModelRunner:
    def __init__(self, model: nn.Module, num_pages: int, block_tokens: int,
                 prepack_weights: bool = True, keep_plain_weights: bool = True):
        """prepack_weights: hold bf16 CPU projection weights in oneDNN's packed layout
        (packed_linear.py: ~1.4x faster decode matmuls), beside the plain weights (twice the
        projection weight memory) or, keep_plain_weights=False, instead of them (memory.py)."""
        self.model = model
        config = model.config
        self.param = next(model.parameters())
        self.dtype, self.device = self.param.dtype, self.param.device
        self.targets = wrap_projections(model)
        if prepack_weights:
            prepack_projections([m for m in model.modules() if isinstance(m, BatchedLoraLinear)],
                                keep_plain_weights, model)
        self.layout = KVLayout(config.num_hidden_layers,
                               config.num_key_value_heads * config.head_dim,
                               config.hidden_size, block_tokens)
        self.pages = torch.zeros(num_pages, config.hidden_size, dtype=self.dtype,
                                 device=self.device)
        self.kv = kv_view(self.pages, self.layout)
        self._lora_builder: LoraBatchBuilder | None = None
        # Called with each step's StepInputs before the forward (parallel.py sends them on).
        self.step_hook: Callable[[StepInputs], None] | None = None

    @property
    def page_bytes(self) -> int:
        return self.pages.shape[1] * self.pages.element_size()

    def write_pages(self, page_ids: list[int], pages: torch.Tensor) -> None:
        """Copy host pages into the pool (adapter loads), on the current stream: on CUDA the
        copier's side stream (page_copy.py). From pinned memory neither copy makes the host
        wait (a CUDA index built from a list would: a blocking copy)."""
        index = torch.tensor(page_ids, dtype=torch.long, pin_memory=self.device.type == "cuda")
        # index_copy_ rather than `pages[index] = ...` (a slow generic index_put on CPU).
        self.pages.index_copy_(0, index.to(self.device, non_blocking=True),
                               pages.to(device=self.device, dtype=self.dtype, non_blocking=True))

    def attach(self, cache: AdapterCache, builder: LoraBatchBuilder | None = None) -> None:
        """builder: a LoraBatchBuilder of another layout (tensor parallelism's shards)."""
        self._lora_builder = builder or LoraBatchBuilder(self.pages, cache, self.targets)

    def run(self, seqs: list[Sequence], num_new_tokens: list[int],
            kv: KVCacheManager) -> tuple[list[Sequence], torch.Tensor]:
        """One forward pass: seqs[i] runs num_new_tokens[i] tokens from its num_computed_tokens
        on (its pages already hold them). Returns the sequences that sample this step, in the
        order used, and their next-token logits [len(those), vocab] (float32)."""
        sampling, inputs = self.prepare(seqs, num_new_tokens, kv)
        if self.step_hook is not None:       # tensor parallelism: the workers run it too
            self.step_hook(inputs)
        logits = self.execute(inputs)
        # Rows past the sampling ones: prompt positions of requests that asked for prompt
        # logprobs (self.prompt_rows says whose); the engine reads them after the step.
        self.prompt_logits = logits[len(sampling):]
        return sampling, logits[:len(sampling)]

    def prepare(self, seqs: list[Sequence], num_new_tokens: list[int],
                kv: KVCacheManager) -> tuple[list[Sequence], StepInputs]:
        """The step as plain lists (what crosses to tensor-parallel workers)."""
        order = sorted(range(len(seqs)),
                       key=lambda i: (seqs[i].adapter is not None, seqs[i].adapter or ""))
        ids, positions, query_lens, context_lens, page_tables = [], [], [], [], []
        runs: list[tuple[str | None, int]] = []
        sampling, logits_indices = [], []
        # (sequence, first position, count): positions whose logits score the next prompt
        # token, for requests with prompt_logprobs; positions already scored (before a
        # preemption) are not asked again.
        self.prompt_rows: list[tuple[Sequence, int, int]] = []
        prompt_indices: list[int] = []
        for i in order:
            seq, n = seqs[i], num_new_tokens[i]
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            if getattr(seq.params, "prompt_logprobs", None) is not None:
                first = max(start, len(seq.prompt_logprobs) - 1 if seq.prompt_logprobs else 0)
                last = min(end, len(seq.prompt_ids) - 1)
                if last > first:
                    self.prompt_rows.append((seq, first, last - first))
                    prompt_indices += range(len(ids) + first - start, len(ids) + last - start)
            ids += seq.token_slice(start, end)
            positions += range(start, end)
            query_lens.append(n)
            context_lens.append(end)
            page_tables.append(kv.page_ids(seq.request_id))
            if runs and runs[-1][0] == seq.adapter:
                runs[-1] = (seq.adapter, runs[-1][1] + n)
            else:
                runs.append((seq.adapter, n))
            if end == seq.num_tokens:
                sampling.append(seq)
                logits_indices.append(len(ids) - 1)
        return sampling, StepInputs(ids, positions, query_lens, context_lens, page_tables, runs,
                                    logits_indices + prompt_indices)

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """The forward pass of a prepared step: logits [len(logits_indices), vocab] (float32)."""
        attention = PagedAttention(self.kv, self.layout, inputs.query_lens, inputs.context_lens,
                                   inputs.page_tables)
        lora = self._lora_builder.build(inputs.runs) if self._lora_builder else None
        batch = ForwardBatch(positions=torch.tensor([inputs.positions], device=self.device),
                             attention=attention, lora=lora)
        input_ids = torch.tensor([inputs.ids], device=self.device)
        logits = self.model(input_ids, batch, logits_indices=torch.tensor(
            inputs.logits_indices, dtype=torch.long, device=self.device))        # [1, N, V]
        return logits[0].float()
