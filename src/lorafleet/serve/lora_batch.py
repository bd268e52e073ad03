"""The step's LoRA metadata (`ForwardBatch.lora`): for each target module, the weights of the
step's distinct adapters read from the pool, and which rows use which.

Built by the runner once per step, in two parts:
- the *working set*: per target module, the A rows and B^T rows of recently used adapters,
  stacked along the rank axis (`a [n, in]`, `bt [n, out]`, each adapter with its own rank, no
  padding). An adapter that joins the batch has its pages copied from the
  pool once (one `index_select` for all joiners, then a slice copy per module), into the rows of
  a departed adapter of the same rank when there is one, else appended. Departed adapters'
  rows are *holes* (masked out, never read by a segment) until holes exceed
  `MAX_HOLE_FRACTION` of the rows, when the stack is rebuilt with the current adapters only.
  With continuous batching the adapter set changes on most steps, and re-gathering every
  adapter each time cost more than the LoRA matmuls themselves.
- the row segments and, for the dense path, the masks (cached per batch composition, so decode
  steps that keep the same requests rebuild nothing).

`gather_module_reference` reads one adapter's A and B^T straight from its pool pages: the
definition the working set is tested against.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .adapter_cache import AdapterCache, ModuleSlice
from .lora_ops import ModuleLora, Segment, choose_dense, segment_mask

BATCH_CACHE_SIZE = 8      # recent batch compositions kept (decode steps repeat the same one)
MAX_HOLE_FRACTION = 0.25  # rebuild a module's stack when more of its rows belong to no adapter
MIN_CAPACITY = 64         # rank rows allocated at first per module (grows by doubling)


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
class _ModuleStack:
    """One module's stacked adapters, in page form (`a_ppr` pages per A row)."""
    a_pages: torch.Tensor        # [capacity * a_ppr, H]
    b_pages: torch.Tensor        # [capacity * b_ppr, H]
    a_ppr: int
    b_ppr: int
    in_features: int
    out_features: int
    used: int = 0                # rank rows filled (live adapters and holes)
    entries: dict = field(default_factory=dict)   # key -> (rank_start, rank, scaling)

    @property
    def capacity(self) -> int:
        return self.a_pages.shape[0] // self.a_ppr

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.a_pages[:self.used * self.a_ppr].view(self.used, -1)[:, :self.in_features]
        bt = self.b_pages[:self.used * self.b_ppr].view(self.used, -1)[:, :self.out_features]
        return a, bt


class LoraBatchBuilder:
    def __init__(self, pages: torch.Tensor, cache: AdapterCache):
        self.pages, self.cache = pages, cache
        self._stacks: dict[str, _ModuleStack] = {}
        self._batches: OrderedDict[tuple, LoraBatch] = OrderedDict()
        self.gathers = self.rebuilds = 0     # counters (tests, benchmarks)

    def build(self, runs: list[tuple[str | None, int]]) -> LoraBatch | None:
        """runs: (adapter or None, number of rows) for consecutive row ranges, in row order.
        All named adapters must be resident. None when no row uses an adapter."""
        names = list(dict.fromkeys(name for name, _ in runs if name is not None))
        if not names:
            return None
        # An adapter re-registered under the same name gets a new load id: a new key.
        keys = {name: (name, self.cache.load_id[name]) for name in names}
        batch_key = (tuple(keys.values()), tuple(runs))
        if batch_key in self._batches:
            self._batches.move_to_end(batch_key)
            return self._batches[batch_key]
        self._update_stacks(names, keys)
        num_rows = sum(n for _, n in runs)
        modules, masks = {}, {}
        for module, stack in self._stacks.items():
            segments, row = [], 0
            for name, n in runs:
                entry = None if name is None else stack.entries.get(keys[name])
                if entry is not None:
                    segments.append(Segment(row, row + n, *entry))
                row += n
            if not segments:
                continue
            a, bt = stack.views()
            lora = ModuleLora(a, bt, segments)
            if choose_dense(num_rows, stack.used, segments, stack.in_features,
                            stack.out_features):
                # q_proj of every layer (typically) has the same segments: one mask for all.
                signature = (stack.used, *((s.row_start, s.row_end, s.rank_start, s.rank,
                                            s.scaling) for s in segments))
                if signature not in masks:
                    masks[signature] = segment_mask(num_rows, segments, stack.used,
                                                    self.pages.dtype, self.pages.device)
                lora.mask = masks[signature]
            modules[module] = lora
        batch = LoraBatch(modules)
        self._batches[batch_key] = batch
        if len(self._batches) > BATCH_CACHE_SIZE:
            self._batches.popitem(last=False)
        return batch

    def _update_stacks(self, names: list[str], keys: dict[str, tuple]) -> None:
        """Append the adapters missing from each module's stack (one pool gather for all);
        rebuild a stack whose holes grew too many (a rebuild or growth allocates new tensors;
        rows reused in place clear the batch cache, whose views may cover them)."""
        live = set(keys.values())
        wanted: dict[str, list] = {}                  # module -> [(key, slice, name)]
        for name in names:
            for module, s in self.cache.host[name].modules.items():
                wanted.setdefault(module, []).append((keys[name], s, name))
        placements: list[tuple[_ModuleStack, tuple, ModuleSlice, str, int]] = []
        for module, entries in wanted.items():
            stack = self._stacks.get(module)
            missing = entries if stack is None else [e for e in entries
                                                     if e[0] not in stack.entries]
            if stack is not None:
                # A joiner takes the rows of a departed adapter of the same rank (ranks repeat,
                # so this is the common case); others are appended.
                free: dict[int, list] = {}
                for key, (row, rank, _) in stack.entries.items():
                    if key not in live:
                        free.setdefault(rank, []).append((key, row))
                reused, appended = [], []
                for entry in missing:
                    spot = free.get(entry[1].rank)
                    (reused if spot else appended).append((entry, spot.pop() if spot else None))
                holes = sum(len(v) * r for r, v in free.items())
                needed = sum(e[1].rank for e, _ in appended)
                # Holes cost the dense path multiply-adds on every step: bound them.
                if holes > MAX_HOLE_FRACTION * (stack.used + needed):
                    stack = None
                elif not missing:
                    continue
            if stack is None:
                self.rebuilds += 1
                reused, appended = [], [(e, None) for e in entries]
                needed = sum(e[1].rank for e in entries)
                stack = self._new_stack(entries[0][1], max(MIN_CAPACITY, 2 * needed))
            elif stack.used + needed > stack.capacity:
                stack = self._grow(stack, 2 * (stack.used + needed))
            self._stacks[module] = stack
            for (key, s, name), (old_key, row) in reused:
                del stack.entries[old_key]
                placements.append((stack, key, s, name, row))
                # Rows are overwritten in place: a cached batch may still point at them.
                self._batches.clear()
            for (key, s, name), _ in appended:
                placements.append((stack, key, s, name, stack.used))
                stack.used += s.rank
        if not placements:
            return
        page_ids, copies = [], []
        for stack, key, s, name, row in placements:
            resident = self.cache.resident[name]
            a_lo = len(page_ids)
            page_ids += resident[s.a_page:s.a_page + s.rank * s.a_pages_per_row]
            b_lo = len(page_ids)
            page_ids += resident[s.b_page:s.b_page + s.rank * s.b_pages_per_row]
            copies.append((stack, key, s, row, a_lo, b_lo, len(page_ids)))
        # index_select, not `pages[index]`: advanced indexing takes a slower generic path on
        # CPU (about 9 ms against 1-2 ms for 5,700 pages of 1024 bf16 numbers).
        gathered = self.pages.index_select(0, torch.tensor(page_ids, device=self.pages.device))
        self.gathers += 1
        for stack, key, s, row, a_lo, b_lo, end in copies:
            stack.a_pages[row * stack.a_ppr:(row + s.rank) * stack.a_ppr] = gathered[a_lo:b_lo]
            stack.b_pages[row * stack.b_ppr:(row + s.rank) * stack.b_ppr] = gathered[b_lo:end]
            stack.entries[key] = (row, s.rank, s.scaling)

    def _new_stack(self, s: ModuleSlice, capacity: int) -> _ModuleStack:
        H = self.pages.shape[1]
        return _ModuleStack(
            self.pages.new_empty(capacity * s.a_pages_per_row, H),
            self.pages.new_empty(capacity * s.b_pages_per_row, H),
            s.a_pages_per_row, s.b_pages_per_row, s.in_features, s.out_features)

    def _grow(self, stack: _ModuleStack, capacity: int) -> _ModuleStack:
        grown = _ModuleStack(
            self.pages.new_empty(capacity * stack.a_ppr, stack.a_pages.shape[1]),
            self.pages.new_empty(capacity * stack.b_ppr, stack.b_pages.shape[1]),
            stack.a_ppr, stack.b_ppr, stack.in_features, stack.out_features, stack.used,
            dict(stack.entries))
        grown.a_pages[:stack.used * stack.a_ppr] = stack.a_pages[:stack.used * stack.a_ppr]
        grown.b_pages[:stack.used * stack.b_ppr] = stack.b_pages[:stack.used * stack.b_ppr]
        return grown
