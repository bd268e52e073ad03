"""Batched heterogeneous LoRA: every row of a batch adds its own adapter's low-rank product
(or nothing, for base-model rows), S-LoRA sec. 4 / Punica's SGMV:

    shrink:  h = x @ A^T            x [T, in], A [r, in]    -> h [T, r]
    expand:  y += scaling * h @ B^T                 B^T [r, out] -> y [T, out]

The step's adapters for one target module come as one `PagedModuleLora`: *segments*
(contiguous row ranges that use one adapter; the runner orders sequences by adapter, so a
prefill segment is a sequence's tokens and a decode segment is the rows of all sequences sharing
an adapter), each with its rank (no padding to a maximum) and scaling, and a page table naming
the pool pages that hold each segment's A and B^T rows, read where they are.

Every implementation is a function `kernel(y, x, pages, module)` that adds the delta into y in
place, held equal by tests:
- `lora_delta_paged_reference`: the definition, a loop over segments in float32;
- `sgmv_cpu` (sgmv_cpu.py, C) and `sgmv_triton` (triton_ops.py, CUDA): read the pages in place,
  one call per module;
- `sgmv_torch`: the fallback for pools no kernel serves (a CPU without a C compiler, a float16
  pool, a GPU without Triton, `LORAFLEET_SGMV_KERNEL=0`). PyTorch cannot multiply through a
  page table, so it copies the module's segments out of the pool on every call (one
  `index_select` into stacks `a [sum_r, in]`, `bt [sum_r, out]`; which pages, and the dense
  path's mask, are derived once per batch) and then either runs one shrink + expand per
  segment (*grouped*, MBGMM-like: no wasted FLOPs, a few framework calls per segment) or
  multiplies every row by every segment's ranks with a `[T, sum_r]` mask that keeps each row's
  own columns and holds the scaling (*dense*: wastes `T * (sum_r - r_row)` multiply-adds but
  makes three calls in all, faster while `T * sum_r` is small, i.e. decode). `choose_dense`
  picks by a cost model.

Tried and measured slower on CPU for the torch path (bench model: hidden 1024, 4 layers, bf16,
300 adapters of ranks 8/16/32, 48 requests, decode batch ~21 rows, ~17 adapters per step): an
MBGMV path that groups rows by rank, gathers each row's own A and scaled B^T (one index_select
per rank group) and runs two `bmm` per group. bf16 `bmm` of such tiny batches is ~3x slower than
float32 here (24 against 7 us for 7 x [1 x 1024] @ [1024 x 16]), so the gathered rows had to be
float32; per module it then beats dense (93 against 112 us for q_proj, 84 against 94 us for
v_proj), but the per-row gather + cast (0.2-1 ms per module) costs far more than it saves:
decode step 20.0 ms against 17.3 ms for dense (forced paths, alternated in one process). What
it needed is a kernel that reads each row's pages in place: sgmv_cpu / sgmv_triton.
"""
from __future__ import annotations

import functools
from array import array
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from lorafleet.errors import EngineError
from lorafleet.models.modules import linear_features

# Cost model for choosing the dense path: one framework call (dispatch + a tiny matmul) costs
# about as much time as this many multiply-adds of a bf16 matmul. Measured on the 2-core dev
# CPU (about 10 us per call at ~400 GFLOP/s sustained on small shapes); on a GPU the ratio is
# larger, which favours the dense path even more.
CALL_COST_MACS = 2_000_000
CALLS_PER_SEGMENT = 6          # 4 slicing views + shrink + expand
DORA_FACTORS_KEPT = 64         # DoRA rescale vectors kept per projection (one per adapter load)


@dataclass
class PagedModuleLora:
    """One target module's share of a step's adapters, read from the pool pages in place (the
    kernels' input: S-LoRA's MBGMM/MBGMV, Punica's SGMV, no gathered copy of the weights).

    Segment s covers rows `seg_rows[s, 0] <= t < seg_rows[s, 1]` with rank `seg_rank[s]` and
    scaling `seg_scale[s]`. Row k of its A (`[r, in]`) is pages
    `page_ids[seg_a[s] + k * a_pages_per_row + j]` for j < a_pages_per_row, concatenated and
    cut to `in_features`; row k of its B^T (`[r, out]`) likewise from `seg_b[s]`. Rows in no
    segment (base-model rows), and segments of rank 0 (their adapter does not adapt this
    module), get no delta. Index tensors are int32 on the pool's device."""
    in_features: int
    out_features: int
    a_pages_per_row: int
    b_pages_per_row: int
    seg_rows: torch.Tensor     # int32 [S, 2]
    seg_rank: torch.Tensor     # int32 [S]
    seg_scale: torch.Tensor    # float32 [S]
    seg_a: torch.Tensor        # int32 [S]  offset of the segment's A page ids in page_ids
    seg_b: torch.Tensor        # int32 [S]
    page_ids: torch.Tensor     # int32 [K]
    max_rank: int              # largest seg_rank (grid sizing)
    max_rows: int              # longest segment
    # DoRA segments: (first row, end row, (adapter, load id), its page ids, its ModuleSlice);
    # the kernels ignore them, BatchedLoraLinear rescales those rows after the kernel.
    dora: tuple = ()

    @functools.cached_property
    def copy_plan(self) -> CopyPlan:
        """What the torch fallback derives from these fields, once per object: the builder
        reuses a batch, and so this object, for every step that keeps its composition."""
        return plan_copy(self)


# -- the definitions --------------------------------------------------------------------------
def paged_weights(pages: torch.Tensor, module: PagedModuleLora, segment: int
                  ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A [r, in], B^T [r, out], scaling) of one segment, read from its pages: the definition."""
    rank = int(module.seg_rank[segment])
    page_ids = module.page_ids.long()

    def rows(offset: int, pages_per_row: int, dim: int) -> torch.Tensor:
        ids = page_ids[offset:offset + rank * pages_per_row]
        return pages[ids].view(rank, pages_per_row * pages.shape[1])[:, :dim]

    return (rows(int(module.seg_a[segment]), module.a_pages_per_row, module.in_features),
            rows(int(module.seg_b[segment]), module.b_pages_per_row, module.out_features),
            float(module.seg_scale[segment]))


def lora_delta_paged_reference(y: torch.Tensor, x: torch.Tensor, pages: torch.Tensor,
                               module: PagedModuleLora) -> None:
    """y [T, out] += each segment's low-rank product, weights read through the page table;
    computed in float32, added once (the kernels' numerics)."""
    for s in range(module.seg_rank.shape[0]):
        if module.seg_rank[s] == 0:       # the segment's adapter does not adapt this module
            continue
        a, bt, scaling = paged_weights(pages, module, s)
        start, end = (int(v) for v in module.seg_rows[s])
        delta = (x[start:end].float() @ a.float().t()) @ bt.float()
        y[start:end] = (y[start:end].float() + scaling * delta).to(y.dtype)


def lora_delta_reference(x: torch.Tensor, out_features: int,
                         row_weights: list[tuple[torch.Tensor, torch.Tensor, float] | None]
                         ) -> torch.Tensor:
    """The definition row by row: for each row i with weights (A [r, in], B^T [r, out],
    scaling), delta[i] = scaling * (x[i] @ A^T) @ B^T; rows with None get zero."""
    delta = x.new_zeros(x.shape[0], out_features)
    for i, weights in enumerate(row_weights):
        if weights is not None:
            a, bt, scaling = weights
            delta[i] = scaling * ((x[i] @ a.t()) @ bt)
    return delta


# -- the torch fallback ---------------------------------------------------------------------------
class Segment(NamedTuple):
    """A segment of the stacks `gather_segments` returns (the torch fallback's working form)."""
    row_start: int
    row_end: int
    rank_start: int            # the segment's first row in a / bt
    rank: int
    scaling: float


def _index(values: array, device: torch.device) -> torch.Tensor:
    """An int64 tensor of `values`, read in place (`torch.tensor(list)` converts element by
    element: ~50 us against ~10 us via an array for a decode step's 600 page ids, dev CPU)."""
    if not values:   # frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.frombuffer(values, dtype=torch.int64).to(device)


class CopyPlan(NamedTuple):
    """Which pool pages the torch fallback copies for one module: derived from the module's
    metadata alone (the pages' contents are read on every call)."""
    page_ids: torch.Tensor      # int64 [sum_r * (a_ppr + b_ppr)]: the A rows' pages, then B^T's
    sum_rank: int
    segments: list[Segment]     # the live ones (rank > 0), their ranks stacked in row order
    masks: dict                 # (rows, dtype, device) -> segment_mask, built on first use


def plan_copy(module: PagedModuleLora) -> CopyPlan:
    """The pages of each live segment's A rows, then of its B^T rows, looked up in the page
    table (use `module.copy_plan`, which keeps it)."""
    a_ppr, b_ppr = module.a_pages_per_row, module.b_pages_per_row
    rows, ranks = module.seg_rows.tolist(), module.seg_rank.tolist()
    seg_a, seg_b, scales = module.seg_a.tolist(), module.seg_b.tolist(), module.seg_scale.tolist()
    a_entries, b_entries, segments = [], [], []     # positions in page_ids
    for s, rank in enumerate(ranks):
        if rank:
            a_entries += range(seg_a[s], seg_a[s] + rank * a_ppr)
            b_entries += range(seg_b[s], seg_b[s] + rank * b_ppr)
            start = segments[-1].rank_start + segments[-1].rank if segments else 0
            segments.append(Segment(rows[s][0], rows[s][1], start, rank, scales[s]))
    entries = _index(array("q", a_entries + b_entries), module.page_ids.device)
    return CopyPlan(module.page_ids.index_select(0, entries).long(), len(a_entries) // a_ppr,
                    segments, {})


def gather_segments(pages: torch.Tensor, module: PagedModuleLora
                    ) -> tuple[torch.Tensor, torch.Tensor, list[Segment]]:
    """Copy the A and B^T rows of `module`'s segments (rank 0 left out) out of the pool with one
    `index_select`: (a [sum_r, in], bt [sum_r, out], the segments, in row order)."""
    plan = module.copy_plan
    # index_select, not `pages[index]`: advanced indexing takes a slower generic path on CPU
    # (about 9 ms against 1-2 ms for 5,700 pages of 1024 bf16 numbers).
    stacked = pages.index_select(0, plan.page_ids)
    a_width, b_width = (pages_per_row * pages.shape[1] for pages_per_row in
                        (module.a_pages_per_row, module.b_pages_per_row))
    split = plan.sum_rank * module.a_pages_per_row
    a = stacked[:split].view(plan.sum_rank, a_width)[:, :module.in_features]
    bt = stacked[split:].view(plan.sum_rank, b_width)[:, :module.out_features]
    return a, bt, plan.segments


def lora_shrink(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x [T, in], a [r, in] -> [T, r]."""
    return x @ a.t()


def lora_expand(y: torch.Tensor, h: torch.Tensor, bt: torch.Tensor, scaling: float) -> None:
    """y [T, out] += scaling * h [T, r] @ bt [r, out], in place."""
    y.addmm_(h, bt, alpha=scaling)


def lora_delta_grouped(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor,
                       segments: list[Segment]) -> None:
    """y [T, out] += each segment's low-rank product, one shrink + expand per segment."""
    for seg in segments:
        rows = slice(seg.row_start, seg.row_end)
        ranks = slice(seg.rank_start, seg.rank_start + seg.rank)
        lora_expand(y[rows], lora_shrink(x[rows], a[ranks]), bt[ranks], seg.scaling)


def lora_delta_dense(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor,
                     mask: torch.Tensor) -> None:
    """y [T, out] += ((x @ a^T) * mask) @ bt: every row against every segment, masked."""
    h = lora_shrink(x, a)
    h.mul_(mask)
    y.addmm_(h, bt)


def segment_mask(num_rows: int, segments: list[Segment], sum_rank: int,
                 dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[T, sum_r]: mask[i, j] = scaling of row i's segment if column j is one of its ranks.
    Built with a few vectorised calls whatever the number of segments."""
    row_segment = array("q", [-1]) * num_rows        # -1: a base row
    column_segment = array("q", [0]) * sum_rank
    for s, seg in enumerate(segments):
        row_segment[seg.row_start:seg.row_end] = array("q", [s]) * (seg.row_end - seg.row_start)
        column_segment[seg.rank_start:seg.rank_start + seg.rank] = array("q", [s]) * seg.rank
    columns = _index(column_segment, device)
    same = _index(row_segment, device)[:, None] == columns[None, :]
    scaling = torch.tensor([seg.scaling for seg in segments], device=device)
    return (same * scaling[columns][None, :]).to(dtype)


def choose_dense(num_rows: int, sum_rank: int, segments: list[Segment], in_features: int,
                 out_features: int) -> bool:
    """Dense when its wasted multiply-adds cost less than the grouped path's extra calls."""
    useful = sum((s.row_end - s.row_start) * s.rank for s in segments)
    wasted_macs = (num_rows * sum_rank - useful) * (in_features + out_features)
    return wasted_macs <= CALL_COST_MACS * CALLS_PER_SEGMENT * (len(segments) - 1)


def sgmv_torch(y: torch.Tensor, x: torch.Tensor, pages: torch.Tensor,
               module: PagedModuleLora) -> None:
    """y [T, out] += the batch's heterogeneous LoRA delta for x [T, in], in place, in PyTorch:
    the kernels' signature and result, for any pool. Computes in the wider of x's and the
    pool's dtypes (a 4-bit base may compute in another dtype than the pool's)."""
    if not module.copy_plan.segments:
        return
    a, bt, segments = gather_segments(pages, module)
    dtype = torch.promote_types(x.dtype, pages.dtype)
    a, bt, x = a.to(dtype), bt.to(dtype), x.to(dtype)
    out = y if y.dtype == dtype else torch.zeros(y.shape, dtype=dtype, device=y.device)
    if choose_dense(x.shape[0], a.shape[0], segments, module.in_features, module.out_features):
        masks, key = module.copy_plan.masks, (x.shape[0], dtype, x.device)
        if key not in masks:
            masks[key] = segment_mask(x.shape[0], segments, a.shape[0], dtype, x.device)
        lora_delta_dense(out, x, a, bt, masks[key])
    else:
        lora_delta_grouped(out, x, a, bt, segments)
    if out is not y:
        y += out.to(y.dtype)


class BatchedLoraLinear(nn.Module):
    """A thin shell the runner swaps in for each projection: forward(x, lora) = base(x) + the
    batched LoRA delta of the rows whose adapter targets this module. `lora` is the step's
    `LoraBatch` (lora_batch.py); base-model rows and untargeted modules get no delta."""

    def __init__(self, base_layer: nn.Module, name: str):
        super().__init__()
        self.base_layer, self.name = base_layer, name
        self.in_features, self.out_features = linear_features(base_layer)
        # DoRA: g = m / ||W0 + s B A||_row per (adapter, load id), computed on first use
        self._dora_factors: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        y = self.base_layer(x)
        module = None if lora is None else lora.modules.get(self.name)
        if module is None:
            return y
        y2d, x2d = y.view(-1, self.out_features), x.reshape(-1, self.in_features)
        # The kernels take x, y and the pool in one dtype; a 4-bit base may compute in another.
        kernel = lora.kernel if x2d.dtype == y2d.dtype == lora.pages.dtype else sgmv_torch
        kernel(y2d, x2d, lora.pages, module)
        for start, end, key, page_ids, s in module.dora:
            # DoRA (lora/dora.py): y = g * (W0 x + s B A x) + bias for this adapter's rows
            factor = self._dora_factor(key, lora.pages, page_ids, s).to(y2d.dtype)
            bias = getattr(self.base_layer, "bias", None)
            rows = y2d[start:end]
            if bias is None:
                rows.mul_(factor)
            else:
                rows.sub_(bias.to(y2d.dtype)).mul_(factor).add_(bias.to(y2d.dtype))
        return y

    @torch.no_grad()
    def _dora_factor(self, key: tuple, pages: torch.Tensor, page_ids, s) -> torch.Tensor:
        """g = m / ||W0 + s B A||_row of one resident DoRA adapter, from its pool pages and the
        base weight, once per load (it costs about r/in of a full matmul with W0; later steps
        pay one multiply per output of its rows)."""
        if key in self._dora_factors:
            return self._dora_factors[key]
        from lorafleet.lora.dora import dora_factor
        from lorafleet.models.modules import is_conv1d

        def rows(first: int, count: int, per_row: int, width: int) -> torch.Tensor:
            ids = torch.tensor(page_ids[first:first + count * per_row], device=pages.device)
            return pages.index_select(0, ids).view(count, -1)[:, :width]

        a = rows(s.a_page, s.rank, s.a_pages_per_row, s.in_features)
        bt = rows(s.b_page, s.rank, s.b_pages_per_row, s.out_features)
        magnitude = rows(s.m_page, 1, s.b_pages_per_row, s.out_features)[0]
        weight = self.base_layer.weight
        weight = (weight.T if is_conv1d(self.base_layer) else weight).float()
        full = (s.out_features, s.in_features)
        if tuple(weight.shape) != full or a.shape[1] != full[1] or bt.shape[1] != full[0]:
            # a tensor-parallel shard holds part of W0's rows or columns and of every page;
            # the row norm needs all of them
            raise EngineError(f"adapter {key[0]!r}: DoRA adapters are not served with tensor "
                              f"parallelism ({self.name}: shard {list(weight.shape)} of {list(full)})")
        factor = dora_factor(magnitude.float(), weight,
                             (bt.float().T @ a.float()) * s.scaling)
        if len(self._dora_factors) >= DORA_FACTORS_KEPT:   # bounded: drop the oldest
            self._dora_factors.pop(next(iter(self._dora_factors)))
        self._dora_factors[key] = factor
        return factor
