"""The step's LoRA metadata (`ForwardBatch.lora`): for each target module, a `PagedModuleLora`
naming the pool pages of the step's distinct adapters and which rows use which, and the kernel
that multiplies through it: the C kernel on CPU (sgmv_cpu.py), Triton on CUDA (triton_ops.py),
or, for pools neither serves, `sgmv_torch` (lora_ops.py), a function of the same signature.

Nothing is copied for the kernels: they read the weights in place. Built so that the Python work
per step does not grow with the number of modules times adapters:
- per resident adapter, once per load: its page ids (int32) and, for every projection of the
  model, (first A page, first B^T page, rank) and the scaling, rank 0 where it has no LoRA;
- per adapter set: one table of every adapter's page ids (`torch.cat`) and those per-module rows
  stacked, their page offsets moved into the table;
- per batch composition: the row segments, and each module's segment columns taken from the
  stacked rows with one indexing op for all modules. A segment whose adapter does not adapt a
  module has rank 0 there (every kernel skips it).

`gather_module_reference` reads one adapter's A and B^T straight from its pool pages: the
definition the page tables are tested against (test_lora_batch.py).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from .adapter_cache import AdapterCache, ModuleSlice
from .lora_ops import PagedModuleLora, sgmv_torch

PLAN_CACHE_SIZE = 8      # distinct recent adapter sets kept (decode steps repeat the same one)

# kernel(y [T, out], x [T, in], pages [P, H], module: PagedModuleLora): y += the LoRA delta
PagedKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PagedModuleLora], None]


@dataclass
class LoraBatch:
    modules: dict[str, PagedModuleLora]     # target module name -> its segments and pages
    pages: torch.Tensor                     # the pool [num_pages, H]
    kernel: PagedKernel                     # adds a module's delta: kernel(y, x, pages, module)


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
class _AdapterRows:
    """One resident adapter's page table (module index as in LoraBatchBuilder.modules)."""
    page_ids: torch.Tensor      # int32 [n]: the adapter's pool pages
    rows: torch.Tensor          # int32 [M, 3]: (first A page, first B^T page, rank), relative
    scaling: torch.Tensor       # float32 [M]
    modules: frozenset[int]     # the modules it adapts
    dora: dict[int, ModuleSlice] # DoRA adapters: module index -> its slice (magnitude page)


@dataclass
class _Plan:
    page_ids: torch.Tensor      # int32 [K]: every adapter's pages, adapter after adapter
    rows: torch.Tensor          # int32 [A, M, 3]: offsets into page_ids, and ranks
    scaling: torch.Tensor       # float32 [A, M]
    modules: list[int]          # modules some adapter of the set adapts
    max_rank: list[int]         # [M]


class LoraBatchBuilder:
    def __init__(self, pages: torch.Tensor, cache: AdapterCache,
                 targets: dict[str, tuple[int, int]], kernel="auto"):
        """targets: every projection that adapters may adapt -> (in_features, out_features).
        kernel: a PagedKernel, None (no kernel: `sgmv_torch`), or "auto"
        (`paged_kernel(pages)`)."""
        self.pages, self.cache = pages, cache
        self.kernel = paged_kernel(pages) if kernel == "auto" else kernel
        self.modules = list(targets)
        self._module_index = {name: i for i, name in enumerate(self.modules)}
        page_size = pages.shape[1]
        self._shapes = [(fan_in, fan_out, -(-fan_in // page_size), -(-fan_out // page_size))
                        for fan_in, fan_out in targets.values()]
        self._adapter_rows: dict[tuple[str, int], _AdapterRows] = {}
        self._plans: OrderedDict[tuple, _Plan] = OrderedDict()
        self._batches: OrderedDict[tuple, LoraBatch] = OrderedDict()
        self.gathers = 0       # sgmv_torch calls, each a copy out of the pool: tests, benchmarks

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
        batch = self._build(self._plan(plan_key), names, runs)
        self._add_dora(batch, plan_key, runs)
        self._batches[batch_key] = batch
        if len(self._batches) > PLAN_CACHE_SIZE:
            self._batches.popitem(last=False)
        return batch

    def _sgmv_torch(self, y: torch.Tensor, x: torch.Tensor, pages: torch.Tensor,
                    module: PagedModuleLora) -> None:
        """The kernel where none serves the pool: `sgmv_torch`, its gathers counted."""
        self.gathers += 1
        sgmv_torch(y, x, pages, module)

    def _build(self, plan: _Plan, names: list[str],
               runs: list[tuple[str | None, int]]) -> LoraBatch:
        index_of = {name: i for i, name in enumerate(names)}
        device, seg_rows, seg_adapter, row = self.pages.device, [], [], 0
        for name, n in runs:
            if name is not None:
                seg_rows.append((row, row + n))
                seg_adapter.append(index_of[name])
            row += n
        seg_index = torch.tensor(seg_adapter, device=device)
        # [M, 3, S] and [M, S]: per module, each segment's A offset, B^T offset, rank; scaling
        columns = plan.rows[seg_index].permute(1, 2, 0).contiguous()
        scaling = plan.scaling[seg_index].t().contiguous()
        rows = torch.tensor(seg_rows, dtype=torch.int32, device=device)
        max_rows = max(end - start for start, end in seg_rows)
        modules = {}
        for m in plan.modules:
            seg_a, seg_b, rank = columns[m]
            fan_in, fan_out, a_ppr, b_ppr = self._shapes[m]
            modules[self.modules[m]] = PagedModuleLora(
                fan_in, fan_out, a_ppr, b_ppr, rows, rank, scaling[m], seg_a, seg_b,
                plan.page_ids, plan.max_rank[m], max_rows)
        return LoraBatch(modules, self.pages, self.kernel or self._sgmv_torch)

    def _add_dora(self, batch: LoraBatch, plan_key: tuple, runs) -> None:
        """DoRA adapters' row ranges per module (`PagedModuleLora.dora`): the kernel adds their
        s B A x like any LoRA's; BatchedLoraLinear then rescales those rows (lora_ops.py)."""
        adapters = {name: self._adapter_rows_of(name, load_id) for name, load_id in plan_key}
        if not any(a.dora for a in adapters.values()):
            return
        load_ids, row, per_module = dict(plan_key), 0, {}
        for name, n in runs:
            if name is not None:
                for m, s in adapters[name].dora.items():
                    per_module.setdefault(self.modules[m], []).append(
                        (row, row + n, (name, load_ids[name]), self.cache.resident[name], s))
            row += n
        for module, segments in per_module.items():
            batch.modules[module].dora = tuple(segments)

    def _plan(self, plan_key: tuple) -> _Plan:
        if plan_key in self._plans:
            self._plans.move_to_end(plan_key)
            return self._plans[plan_key]
        adapters = [self._adapter_rows_of(name, load_id) for name, load_id in plan_key]
        offsets, total = [], 0
        for adapter in adapters:
            offsets.append(total)
            total += adapter.page_ids.shape[0]
        device = self.pages.device
        rows = torch.stack([a.rows for a in adapters])
        rows[:, :, :2] += torch.tensor(offsets, dtype=torch.int32, device=device)[:, None, None]
        plan = _Plan(torch.cat([a.page_ids for a in adapters]), rows,
                          torch.stack([a.scaling for a in adapters]),
                          sorted(frozenset().union(*(a.modules for a in adapters))),
                          rows[:, :, 2].amax(0).tolist())
        self._plans[plan_key] = plan
        if len(self._plans) > PLAN_CACHE_SIZE:
            self._plans.popitem(last=False)
        return plan

    def _adapter_rows_of(self, name: str, load_id: int) -> _AdapterRows:
        key = (name, load_id)
        if key not in self._adapter_rows:
            rows = [[0, 0, 0] for _ in self.modules]
            scaling = [0.0] * len(self.modules)
            dora = {}
            for module, s in self.cache.host[name].modules.items():
                m = self._module_index[module]
                rows[m], scaling[m] = [s.a_page, s.b_page, s.rank], s.scaling
                if getattr(s, "m_page", -1) >= 0:
                    dora[m] = s
            device = self.pages.device
            self._adapter_rows = {k: v for k, v in self._adapter_rows.items()
                                  if self.cache.load_id.get(k[0]) == k[1]}   # drop unloaded
            self._adapter_rows[key] = _AdapterRows(
                torch.tensor(self.cache.resident[name], dtype=torch.int32, device=device),
                torch.tensor(rows, dtype=torch.int32, device=device),
                torch.tensor(scaling, dtype=torch.float32, device=device),
                frozenset(self._module_index[m] for m in self.cache.host[name].modules), dora)
        return self._adapter_rows[key]
