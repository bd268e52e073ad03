"""The step's LoRA metadata (`ForwardBatch.lora`): for each target module, the weights of the
step's distinct adapters read from the pool, and which rows use which.

Built by the runner once per step, in two parts:
- a *plan* per set of resident adapters (cached while the set and their pages stay the same):
  the page ids of every (module, adapter) A and B^T, gathered from the pool with one indexed copy
  into a `[n, H]` buffer, module by module, so each module's stacked `a [sum_r, in]` and
  `bt [sum_r, out]` are views of that buffer;
- the row segments and, for the dense path, the masks (cached per batch composition, so decode
  steps that keep the same requests rebuild nothing).

`gather_module_reference` reads one adapter's A and B^T straight from its pool pages: the
definition the gathered stacks are tested against (test_lora_batch.py).

Tried and measured slower (CPU time of a fixed workload, 1000 adapters): an incremental working
set (copy only the adapters that join the batch, reuse departed ones' rows, rebuild past 25%
holes). The per-adapter slice copies and the hole rows the dense path then multiplies cost more
than one `index_select` of every adapter of the step.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .adapter_cache import AdapterCache, ModuleSlice
from .lora_ops import ModuleLora, Segment, choose_dense, segment_mask

PLAN_CACHE_SIZE = 8      # distinct recent adapter sets kept (decode steps repeat the same one)


@dataclass
class LoraBatch:
    modules: dict[str, ModuleLora]


def gather_module_reference(pages: torch.Tensor, page_ids: list[int], s: ModuleSlice
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B^T [r, out]) of one module of a resident adapter, read from its pages."""
    a = torch.stack([pages[page_ids[s.a_page + i * s.a_pages_per_row + j]]
                     for i in range(s.rank) for j in range(s.a_pages_per_row)])
    bt = torch.stack([pages[page_ids[s.b_page + i * s.b_pages_per_row + j]]
                      for i in range(s.rank) for j in range(s.b_pages_per_row)])
    return (a.view(s.rank, -1)[:, :s.in_features], bt.view(s.rank, -1)[:, :s.out_features])


@dataclass
class _ModulePlan:
    a: torch.Tensor                              # [sum_r, in] view of the gathered buffer
    bt: torch.Tensor                             # [sum_r, out]
    adapters: dict[int, tuple[int, int, float]]  # adapter index -> (rank_start, rank, scaling)


class LoraBatchBuilder:
    def __init__(self, pages: torch.Tensor, cache: AdapterCache):
        self.pages, self.cache = pages, cache
        self._plans: OrderedDict[tuple, dict[str, _ModulePlan]] = OrderedDict()
        self._batches: OrderedDict[tuple, LoraBatch] = OrderedDict()
        self.gathers = 0       # pool gathers (one per new adapter set): tests, benchmarks

    def build(self, runs: list[tuple[str | None, int]]) -> LoraBatch | None:
        """runs: (adapter or None, number of rows) for consecutive row ranges, in row order.
        All named adapters must be resident. None when no row uses an adapter."""
        names = list(dict.fromkeys(name for name, _ in runs if name is not None))
        if not names:
            return None
        plan_key = tuple((name, self.cache.load_id[name]) for name in names)
        batch_key = (plan_key, tuple(runs))
        if batch_key in self._batches:
            self._batches.move_to_end(batch_key)
            return self._batches[batch_key]
        plan = self._plan(plan_key, names)
        index_of = {name: i for i, name in enumerate(names)}
        num_rows = sum(n for _, n in runs)
        modules, masks = {}, {}
        for module, module_plan in plan.items():
            segments, row = [], 0
            for name, n in runs:
                if name is not None and index_of[name] in module_plan.adapters:
                    rank_start, rank, scaling = module_plan.adapters[index_of[name]]
                    segments.append(Segment(row, row + n, rank_start, rank, scaling))
                row += n
            if not segments:
                continue
            lora = ModuleLora(module_plan.a, module_plan.bt, segments)
            sum_rank = module_plan.a.shape[0]
            if choose_dense(num_rows, sum_rank, segments, module_plan.a.shape[1],
                            module_plan.bt.shape[1]):
                # q_proj of every layer (typically) has the same segments: one mask for all.
                signature = (sum_rank, *((s.row_start, s.row_end, s.rank_start, s.rank,
                                          s.scaling) for s in segments))
                if signature not in masks:
                    masks[signature] = segment_mask(num_rows, segments, sum_rank,
                                                    self.pages.dtype, self.pages.device)
                lora.mask = masks[signature]
            modules[module] = lora
        batch = LoraBatch(modules)
        self._batches[batch_key] = batch
        if len(self._batches) > PLAN_CACHE_SIZE:
            self._batches.popitem(last=False)
        return batch

    def _plan(self, plan_key: tuple, names: list[str]) -> dict[str, _ModulePlan]:
        if plan_key in self._plans:
            self._plans.move_to_end(plan_key)
            return self._plans[plan_key]
        layout: dict[str, list] = {}
        for i, name in enumerate(names):
            for module, slice_ in self.cache.host[name].modules.items():
                layout.setdefault(module, []).append((i, slice_))
        page_ids, spans = [], {}
        for module, entries in layout.items():
            sum_rank = sum(s.rank for _, s in entries)
            a_start = len(page_ids)
            for i, s in entries:
                resident = self.cache.resident[names[i]]
                page_ids += resident[s.a_page:s.a_page + s.rank * s.a_pages_per_row]
            b_start = len(page_ids)
            for i, s in entries:
                resident = self.cache.resident[names[i]]
                page_ids += resident[s.b_page:s.b_page + s.rank * s.b_pages_per_row]
            spans[module] = (a_start, b_start, len(page_ids), sum_rank)
        # index_select, not `pages[index]`: advanced indexing takes a slower generic path on
        # CPU (about 9 ms against 1-2 ms for 5,700 pages of 1024 bf16 numbers).
        gathered = self.pages.index_select(0, torch.tensor(page_ids, device=self.pages.device))
        self.gathers += 1
        plan = {}
        for module, entries in layout.items():
            a_start, b_start, end, sum_rank = spans[module]
            first = entries[0][1]
            a = gathered[a_start:b_start].view(sum_rank, -1)[:, :first.in_features]
            bt = gathered[b_start:end].view(sum_rank, -1)[:, :first.out_features]
            adapters, rank_start = {}, 0
            for i, s in entries:
                adapters[i] = (rank_start, s.rank, s.scaling)
                rank_start += s.rank
            plan[module] = _ModulePlan(a, bt, adapters)
        self._plans[plan_key] = plan
        if len(self._plans) > PLAN_CACHE_SIZE:
            self._plans.popitem(last=False)
        return plan

