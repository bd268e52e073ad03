"""The step's LoRA metadata (`ForwardBatch.lora`): for each target module, the weights of the
step's distinct adapters read from the pool, and which rows use which.

With a paged kernel (the C kernel on CPU, sgmv_cpu.py; Triton on CUDA, triton_ops.py) nothing is
copied: each module gets a `PagedModuleLora`, the page ids of its adapters' A and B^T rows (one
int32 table per adapter set, cached) and the row segments (cached per batch composition, and
shared by every layer's module of the same kind). The kernel reads the weights in place.

Without one (`kernel=None`, or the kernel unavailable) the torch paths of lora_ops.py need the
weights contiguous, and the batch is built in two parts:
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
from typing import Callable

import torch

from .adapter_cache import AdapterCache, ModuleSlice
from .lora_ops import ModuleLora, PagedModuleLora, Segment, choose_dense, segment_mask

PLAN_CACHE_SIZE = 8      # distinct recent adapter sets kept (decode steps repeat the same one)

# kernel(y [T, out], x [T, in], pages [P, H], module: PagedModuleLora): y += the LoRA delta
PagedKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PagedModuleLora], None]


@dataclass
class LoraBatch:
    modules: dict[str, ModuleLora | PagedModuleLora]
    pages: torch.Tensor | None = None       # the pool, for paged modules
    kernel: PagedKernel | None = None


def paged_kernel(pages: torch.Tensor) -> PagedKernel | None:
    """The kernel that reads adapters in place from a pool like `pages`, or None: the C kernel
    on CPU (float32/bfloat16), Triton on CUDA where triton is installed."""
    if pages.device.type == "cpu":
        from .sgmv_cpu import sgmv_cpu, sgmv_cpu_available
        return sgmv_cpu if sgmv_cpu_available(pages) else None
    try:
        from .triton_ops import sgmv_triton, triton_available
    except ImportError:
        return None
    return sgmv_triton if triton_available(pages.device) else None


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


@dataclass
class _PagedPlan:
    page_ids: torch.Tensor                       # int32 [K]: this module's A and B^T row pages
    adapters: dict[int, tuple[int, int, int, float]]  # index -> (a offset, b offset, r, scaling)
    in_features: int
    out_features: int
    a_pages_per_row: int
    b_pages_per_row: int


class LoraBatchBuilder:
    def __init__(self, pages: torch.Tensor, cache: AdapterCache, kernel="auto"):
        """kernel: a PagedKernel, None (the torch paths, weights gathered), or "auto"
        (`paged_kernel(pages)`)."""
        self.pages, self.cache = pages, cache
        self.kernel = paged_kernel(pages) if kernel == "auto" else kernel
        self._plans: OrderedDict[tuple, dict] = OrderedDict()
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
        if self.kernel is not None:
            batch = self._build_paged(self._paged_plan(plan_key, names), names, runs)
        else:
            batch = self._build_gathered(self._plan(plan_key, names), names, runs)
        self._batches[batch_key] = batch
        if len(self._batches) > PLAN_CACHE_SIZE:
            self._batches.popitem(last=False)
        return batch

    def _build_paged(self, plan: dict[str, _PagedPlan], names: list[str],
                     runs: list[tuple[str | None, int]]) -> LoraBatch:
        index_of = {name: i for i, name in enumerate(names)}
        device, modules, shared = self.pages.device, {}, {}
        for module, module_plan in plan.items():
            segments, row = [], 0
            for name, n in runs:
                if name is not None and index_of[name] in module_plan.adapters:
                    segments.append((row, row + n, *module_plan.adapters[index_of[name]]))
                row += n
            if not segments:
                continue
            # the same module kind in every layer has the same segments: one set of tensors
            key = tuple(segments)
            if key not in shared:
                shared[key] = (
                    torch.tensor([s[:2] for s in segments], dtype=torch.int32, device=device),
                    torch.tensor([s[4] for s in segments], dtype=torch.int32, device=device),
                    torch.tensor([s[5] for s in segments], dtype=torch.float32, device=device),
                    torch.tensor([s[2] for s in segments], dtype=torch.int32, device=device),
                    torch.tensor([s[3] for s in segments], dtype=torch.int32, device=device),
                    max(s[4] for s in segments), max(s[1] - s[0] for s in segments))
            rows, rank, scale, seg_a, seg_b, max_rank, max_rows = shared[key]
            modules[module] = PagedModuleLora(
                module_plan.in_features, module_plan.out_features, module_plan.a_pages_per_row,
                module_plan.b_pages_per_row, rows, rank, scale, seg_a, seg_b,
                module_plan.page_ids, max_rank, max_rows)
        return LoraBatch(modules, self.pages, self.kernel)

    def _paged_plan(self, plan_key: tuple, names: list[str]) -> dict[str, _PagedPlan]:
        """Per module, the page ids of every adapter's A rows then B^T rows, in one int32
        table for the whole adapter set (each module's table is a view of it)."""
        if plan_key in self._plans:
            self._plans.move_to_end(plan_key)
            return self._plans[plan_key]
        layout: dict[str, list] = {}
        for i, name in enumerate(names):
            for module, slice_ in self.cache.host[name].modules.items():
                layout.setdefault(module, []).append((i, slice_))
        page_ids, spans = [], {}
        for module, entries in layout.items():
            start, adapters = len(page_ids), {}
            for i, s in entries:
                resident = self.cache.resident[names[i]]
                a_off = len(page_ids) - start
                page_ids += resident[s.a_page:s.a_page + s.rank * s.a_pages_per_row]
                b_off = len(page_ids) - start
                page_ids += resident[s.b_page:s.b_page + s.rank * s.b_pages_per_row]
                adapters[i] = (a_off, b_off, s.rank, s.scaling)
            spans[module] = (start, len(page_ids), adapters, entries[0][1])
        table = torch.tensor(page_ids, dtype=torch.int32, device=self.pages.device)
        plan = {module: _PagedPlan(table[start:end], adapters, s.in_features, s.out_features,
                                   s.a_pages_per_row, s.b_pages_per_row)
                for module, (start, end, adapters, s) in spans.items()}
        self._plans[plan_key] = plan
        if len(self._plans) > PLAN_CACHE_SIZE:
            self._plans.popitem(last=False)
        return plan

    def _build_gathered(self, plan: dict[str, _ModulePlan], names: list[str],
                        runs: list[tuple[str | None, int]]) -> LoraBatch:
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
        return LoraBatch(modules)

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

