"""Batched heterogeneous LoRA: every row of a batch adds its own adapter's low-rank product
(or nothing, for base-model rows), S-LoRA sec. 4 / Punica's SGMV:

    shrink:  h = x @ A^T            x [T, in], A [r, in]    -> h [T, r]
    expand:  y += scaling * h @ B^T                 B^T [r, out] -> y [T, out]

The step's adapters for one target module come as one `ModuleLora`: their `A`s stacked along
the rank axis (`a [sum_r, in]`, each adapter with its own rank, no padding to a maximum) and
their `B^T`s likewise, plus *segments*: contiguous row ranges that use one adapter (the runner
orders sequences by adapter, so a prefill segment is a sequence's tokens and a decode segment is
the rows of all sequences sharing an adapter).

Three implementations, held equal by tests:
- `lora_delta_reference`: a loop over rows, the definition;
- `lora_delta_grouped`: one shrink and one expand per segment (MBGMM-like; no wasted FLOPs, a few
  framework calls per distinct adapter);
- `lora_delta_dense`: one shrink and one expand for the whole batch against every adapter of the
  step, with a `[T, sum_r]` mask that keeps each row's own adapter's columns (and holds the
  scaling). Wastes `T * (sum_r - r_row)` multiply-adds but makes three calls in all, which is
  faster while `T * sum_r` is small (decode).
`choose_dense` picks by a cost model.

The fast paths proper read the weights where they are: `PagedModuleLora` names each segment's
A and B^T rows by page id, and a kernel (sgmv_cpu.py on CPU, triton_ops.py on CUDA) multiplies
through that table with no copy; `lora_delta_paged_reference` is their definition. The stacked
paths above stay as the torch twins for pools no kernel serves.

Tried and measured slower on CPU (bench model: hidden 1024, 4 layers, bf16, 300 adapters of
ranks 8/16/32, 48 requests, decode batch ~21 rows, ~17 adapters per step): an MBGMV path that
groups rows by rank, gathers each row's own A and scaled B^T (one index_select per rank group)
and runs two `bmm` per group. bf16 `bmm` of such tiny batches is ~3x slower than float32 here
(24 against 7 us for 7 x [1 x 1024] @ [1024 x 16]), so the gathered rows had to be float32; per
module it then beats dense (93 against 112 us for q_proj, 84 against 94 us for v_proj), but the
decode batch's composition changes almost every step (a request finishes or joins), and the
per-row gather + cast (0.2-1 ms per module) costs far more than it saves: decode step 20.0 ms
against 17.3 ms for dense (forced paths, alternated in one process). It needs a kernel that reads
each row's pages in place (Punica BGMV / S-LoRA MBGMV in Triton), which CPU PyTorch lacks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Cost model for choosing the dense path: one framework call (dispatch + a tiny matmul) costs
# about as much time as this many multiply-adds of a bf16 matmul. Measured on the 2-core dev
# CPU (about 10 us per call at ~400 GFLOP/s sustained on small shapes); on a GPU the ratio is
# larger, which favours the dense path even more.
CALL_COST_MACS = 2_000_000
CALLS_PER_SEGMENT = 6          # 4 slicing views + shrink + expand


@dataclass
class Segment:
    row_start: int
    row_end: int
    rank_start: int            # the adapter's first row in ModuleLora.a / .bt
    rank: int
    scaling: float


@dataclass
class ModuleLora:
    """One target module's share of a step's adapters."""
    a: torch.Tensor            # [sum_r, in]
    bt: torch.Tensor           # [sum_r, out]
    segments: list[Segment]
    mask: torch.Tensor | None = None   # [T, sum_r] scaled selection; set means "use dense"


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


def lora_shrink(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x [T, in], a [r, in] -> [T, r]."""
    return x @ a.t()


def lora_expand(y: torch.Tensor, h: torch.Tensor, bt: torch.Tensor, scaling: float) -> None:
    """y [T, out] += scaling * h [T, r] @ bt [r, out], in place."""
    y.addmm_(h, bt, alpha=scaling)


def lora_delta_reference(x: torch.Tensor, out_features: int,
                         row_weights: list[tuple[torch.Tensor, torch.Tensor, float] | None]
                         ) -> torch.Tensor:
    """The definition: for each row i with weights (A [r, in], B^T [r, out], scaling),
    delta[i] = scaling * (x[i] @ A^T) @ B^T; rows with None get zero."""
    delta = x.new_zeros(x.shape[0], out_features)
    for i, weights in enumerate(row_weights):
        if weights is not None:
            a, bt, scaling = weights
            delta[i] = scaling * ((x[i] @ a.t()) @ bt)
    return delta


def lora_delta_grouped(y: torch.Tensor, x: torch.Tensor, module: ModuleLora) -> None:
    """y [T, out] += each segment's low-rank product, one shrink + expand per segment."""
    for seg in module.segments:
        rows = slice(seg.row_start, seg.row_end)
        ranks = slice(seg.rank_start, seg.rank_start + seg.rank)
        lora_expand(y[rows], lora_shrink(x[rows], module.a[ranks]), module.bt[ranks],
                    seg.scaling)


def lora_delta_dense(y: torch.Tensor, x: torch.Tensor, module: ModuleLora) -> None:
    """y [T, out] += ((x @ a^T) * mask) @ bt: every row against every adapter, masked."""
    h = lora_shrink(x, module.a)
    h.mul_(module.mask)
    y.addmm_(h, module.bt)


def segment_mask(num_rows: int, segments: list[Segment], sum_rank: int,
                 dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[T, sum_r]: mask[i, j] = scaling of row i's adapter if column j is one of its ranks.
    Built with a few vectorised calls whatever the number of segments."""
    run_lengths, run_blocks, col_block = [], [], [-2] * sum_rank
    col_scale = [0.0] * sum_rank
    cursor = 0
    for seg in segments:
        if seg.row_start > cursor:
            run_lengths.append(seg.row_start - cursor)
            run_blocks.append(-1)
        run_lengths.append(seg.row_end - seg.row_start)
        run_blocks.append(seg.rank_start)
        cursor = seg.row_end
        col_block[seg.rank_start:seg.rank_start + seg.rank] = [seg.rank_start] * seg.rank
        col_scale[seg.rank_start:seg.rank_start + seg.rank] = [seg.scaling] * seg.rank
    if num_rows > cursor:
        run_lengths.append(num_rows - cursor)
        run_blocks.append(-1)
    row_block = torch.repeat_interleave(torch.tensor(run_blocks), torch.tensor(run_lengths))
    same = row_block[:, None] == torch.tensor(col_block)[None, :]
    return (same * torch.tensor(col_scale)[None, :]).to(dtype=dtype, device=device)


def choose_dense(num_rows: int, sum_rank: int, segments: list[Segment], in_features: int,
                 out_features: int) -> bool:
    """Dense when its wasted multiply-adds cost less than the grouped path's extra calls."""
    useful = sum((s.row_end - s.row_start) * s.rank for s in segments)
    wasted_macs = (num_rows * sum_rank - useful) * (in_features + out_features)
    return wasted_macs <= CALL_COST_MACS * CALLS_PER_SEGMENT * (len(segments) - 1)


def add_lora(y: torch.Tensor, x: torch.Tensor, module: ModuleLora) -> None:
    """y [T, out] += the batch's heterogeneous LoRA delta for x [T, in] (fast path)."""
    if module.mask is not None:
        lora_delta_dense(y, x, module)
    else:
        lora_delta_grouped(y, x, module)


class BatchedLoraLinear(nn.Module):
    """A thin shell the runner swaps in for each projection: forward(x, lora) = base(x) + the
    batched LoRA delta of the rows whose adapter targets this module. `lora` is the step's
    `LoraBatch` (lora_batch.py); base-model rows and untargeted modules get no delta."""

    def __init__(self, base_layer: nn.Module, name: str):
        super().__init__()
        self.base_layer, self.name = base_layer, name
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        y = self.base_layer(x)
        module = None if lora is None else lora.modules.get(self.name)
        if module is None:
            return y
        y2d, x2d = y.view(-1, self.out_features), x.reshape(-1, self.in_features)
        if not isinstance(module, PagedModuleLora):
            add_lora(y2d, x2d, module)
        elif x2d.dtype == y2d.dtype == lora.pages.dtype:
            lora.kernel(y2d, x2d, lora.pages, module)
        else:   # e.g. a 4-bit base computing in another dtype than the pool's: the slow twin
            lora_delta_paged_reference(y2d, x2d, lora.pages, module)
        return y
