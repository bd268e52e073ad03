"""Batched heterogeneous LoRA in Triton, reading the adapter weights from the pool pages in place:
the GPU twin of `lora_ops.lora_delta_paged_reference` (and of sgmv_cpu.py), for one target
module of one step.

    shrink:  h [T, max_rank] (float32) = x [T, in] @ A^T     per segment, A's rows paged
    expand:  y [T, out] += scaling * h @ B^T                  per segment, B^T's rows paged

Correspondence: Punica's SGMV is this shrink/expand pair over *segments* (row ranges sharing an
adapter), with one weight pointer per segment and one rank for all; S-LoRA's MBGMM (prefill) and
MBGMV (decode) add what a pool needs: each adapter its own rank ("multi-size") and its rows
gathered from non-contiguous pages of the unified pool. Here one kernel pair serves both: a
decode segment is a short segment, ranks are per segment (no padding), and rows are found
through the page table.

Addressing (`PagedModuleLora`): row k of segment s's A is the pages
`page_ids[seg_a[s] + k * a_pages_per_row + j]`, j < a_pages_per_row, each one H-vector of
`pages [num_pages, H]`, concatenated and cut to `in`. A kernel tile never straddles a page: the
reduction (shrink) and output (expand) axes are walked as (page j, block within the page), so a
tile needs one page id per rank row and reads a contiguous run of H. The last page of a row is
partial when `in` (`out`) is not a multiple of H; a column mask (`< H` and `< in`) covers it.

Shrink grid: (segment, row block, rank block x split_k). Each program multiplies a
[BLOCK_M, BLOCK_K] tile of x with a [BLOCK_K, BLOCK_R] tile of A^T gathered from the pages,
over every split_k-th K block of its segment's `in` axis, and adds its partial sum into h
(zeroed first) with an atomic add, or stores it when split_k == 1. Split-K (as in vLLM's Triton
port of Punica's shrink) suits decode shapes: a segment has a handful of rows and the rank is
small, so without it the grid would be a few programs, each streaming all of `in`; splitting
`in` puts every SM to work on the weight reads, which are the whole cost (the kernel is
memory-bound on A). split_k is chosen so the grid is about `PROGRAMS_PER_SM` programs per SM.
It is a runtime argument, not a constexpr: the automatic choice follows the number of segments,
which changes from one decode step to the next, and as a constexpr each new value was a new JIT
compile inside the serving loop. What is constexpr (block sizes from max_rows / max_rank rounded
to powers of two, ATOMIC = split_k > 1, dtype) takes a few values, each compiled once.
Expand grid: (segment, row block, out block). Each program owns a [BLOCK_M, BLOCK_N] tile of y
(no race, no atomics), loops over its segment's rank in BLOCK_R steps (the rank axis is short)
and does one read-modify-write of y in float32: y = y + scaling * delta, like the reference.
Mixed ranks need no padding of the weights: loops and masks stop at `seg_rank[s]`; programs of
a grid sized by `max_rows` / `max_rank` that fall outside their segment return at once, and so
do all programs of a rank-0 segment (no read-modify-write of y: its bits stay as they were). The
host reads no device value (the grid comes from the Python ints `max_rows` / `max_rank`), so a
call can be captured in a CUDA graph.

Numerics: float32 accumulation throughout; h is kept in float32. Shrink multiplies x and A in
their own dtype (tensor cores for fp16 / bf16; IEEE float32 for float32 pools, no TF32). Expand
multiplies float32 h by B upcast to float32, in TF32 for 16-bit pools (B is exact in TF32, h is
rounded to 10 mantissa bits: finer than rounding h to bf16, and no fp16 overflow)
and in IEEE float32 for float32 pools. Split-K's atomic adds make h's last bit depend on their
order (not bit-reproducible run to run when split_k > 1).

Addressing in int64: a pool of 1M pages of 8192 (or an x / y whose inner stride is large, e.g.
a transposed view of many rows) puts offsets past 2^31 elements, so every index that is
multiplied by a stride (page id, row, column within `in` / `out` / the page) is widened to int64
first; only the page-table and segment indices (int32 by the format, < 2^31) stay int32.

The Triton interpreter (TRITON_INTERPRET=1, CPU tensors) runs these kernels for tests; its
`tl.dot` multiplies bf16 tiles as raw uint16 bits (numpy has no bf16), so under the interpreter
bf16 shrink tiles are upcast to float32 first (`UPCAST`): exact products, the same numerics.

Triton is optional: this module imports without it (CPU machines) and `triton_available` says
whether `sgmv_triton` can run. The kernels are plain functions jitted on first use, one set per
interpreter setting, and call only Triton builtins (`tl.full`, not the @jit-wrapped `tl.zeros`):
Triton wraps its own library functions when it is imported, so a library call would fail under
an interpreter turned on after `import triton` (as the tests do).
"""
from __future__ import annotations

import contextlib
import functools

import torch

from lorafleet.errors import ShapeError
from lorafleet.serve.lora_ops import PagedModuleLora

try:  # the kernels below are plain functions until `_kernels` jits them
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Split-K aims for this many shrink programs per SM (two waves, so one hides the other's load
# latency). A starting point, not a measurement: it was chosen without a GPU to tune on.
PROGRAMS_PER_SM = 2
MIN_DOT = 16                 # tl.dot needs every tile dimension >= 16


def _shrink(x_ptr, pages_ptr, h_ptr, page_ids_ptr, seg_rows_ptr, seg_rank_ptr, seg_a_ptr,
            stride_xm, stride_xk, stride_page, stride_hidden, stride_hm,
            in_features, hidden, a_pages_per_row, k_blocks_per_page, split_k,
            BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
            ATOMIC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """h[rows of segment, ranks] (+)= x[rows] @ A^T over every split_k-th K block."""
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_r = tl.program_id(2) // split_k
    pid_k = tl.program_id(2) % split_k
    row_end = tl.load(seg_rows_ptr + 2 * seg + 1)
    row0 = tl.load(seg_rows_ptr + 2 * seg) + pid_m * BLOCK_M
    rank = tl.load(seg_rank_ptr + seg)
    if row0 >= row_end or pid_r * BLOCK_R >= rank:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < row_end
    rank_mask = ranks < rank
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    a_row_ids = tl.load(seg_a_ptr + seg) + ranks * a_pages_per_row   # [BLOCK_R] into page_ids
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for kb in range(pid_k, a_pages_per_row * k_blocks_per_page, split_k):
        page_j = kb // k_blocks_per_page
        offs = (kb % k_blocks_per_page) * BLOCK_K + tl.arange(0, BLOCK_K)   # within the page
        cols = page_j * hidden + offs                                        # within `in`
        k_mask = (offs < hidden) & (cols < in_features)
        x = tl.load(x_rows + cols.to(tl.int64)[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        page = tl.load(page_ids_ptr + a_row_ids + page_j, mask=rank_mask, other=0)
        a_t = tl.load(pages_ptr + page.to(tl.int64)[None, :] * stride_page
                      + offs.to(tl.int64)[:, None] * stride_hidden,
                      mask=k_mask[:, None] & rank_mask[None, :], other=0.0)   # [BLOCK_K, BLOCK_R]
        if UPCAST:
            x = x.to(tl.float32)
            a_t = a_t.to(tl.float32)
        acc += tl.dot(x, a_t, input_precision=PRECISION)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + ranks[None, :]
    h_mask = row_mask[:, None] & rank_mask[None, :]
    if not ATOMIC:
        tl.store(h_ptrs, acc, mask=h_mask)
    else:
        tl.atomic_add(h_ptrs, acc, mask=h_mask, sem="relaxed")   # sums need no ordering


def _expand(y_ptr, pages_ptr, h_ptr, page_ids_ptr, seg_rows_ptr, seg_rank_ptr, seg_b_ptr,
            seg_scale_ptr, stride_ym, stride_yn, stride_page, stride_hidden, stride_hm,
            out_features, hidden, b_pages_per_row, n_blocks_per_page,
            BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
            PRECISION: tl.constexpr):
    """y[rows of segment, out block] += scaling * h[rows, :rank] @ B^T[:rank, out block]."""
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    page_j = tl.program_id(2) // n_blocks_per_page
    n0 = (tl.program_id(2) % n_blocks_per_page) * BLOCK_N     # within the page
    row_end = tl.load(seg_rows_ptr + 2 * seg + 1)
    row0 = tl.load(seg_rows_ptr + 2 * seg) + pid_m * BLOCK_M
    rank = tl.load(seg_rank_ptr + seg)
    # rank 0 (the adapter does not adapt this module): no read-modify-write of y at all
    if row0 >= row_end or rank == 0 or page_j * hidden + n0 >= out_features:
        return
    offs = n0 + tl.arange(0, BLOCK_N)
    cols = page_j * hidden + offs
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    n_mask = (offs < hidden) & (cols < out_features)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hm
    b_row_ids = tl.load(seg_b_ptr + seg) + page_j
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_mask = ranks < rank
        h = tl.load(h_rows + ranks[None, :], mask=row_mask[:, None] & rank_mask[None, :],
                    other=0.0)
        page = tl.load(page_ids_ptr + b_row_ids + ranks * b_pages_per_row, mask=rank_mask,
                       other=0)
        bt = tl.load(pages_ptr + page.to(tl.int64)[:, None] * stride_page
                     + offs.to(tl.int64)[None, :] * stride_hidden,
                     mask=rank_mask[:, None] & n_mask[None, :], other=0.0)   # [BLOCK_R, BLOCK_N]
        acc += tl.dot(h, bt.to(tl.float32), input_precision=PRECISION)
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols.to(tl.int64)[None, :] * stride_yn
    y_mask = row_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    scaling = tl.load(seg_scale_ptr + seg)
    tl.store(y_ptrs, (y + scaling * acc).to(y_ptr.dtype.element_ty), mask=y_mask)


@functools.cache
def _kernels(interpret: bool):
    """(shrink, expand) jitted; one pair per interpreter setting, because triton.jit reads
    TRITON_INTERPRET when it wraps a function (tests turn it on and off in one process)."""
    del interpret  # the cache key; triton.jit reads the environment itself
    return triton.jit(_shrink), triton.jit(_expand)


def _interpreting() -> bool:
    return triton.knobs.runtime.interpret


def triton_available(device: torch.device) -> bool:
    """sgmv_triton can run on `device`: triton imports and the device is CUDA, or the Triton
    interpreter is on (TRITON_INTERPRET=1, CPU tensors: tests)."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or _interpreting()


@functools.cache
def _num_sms(device_index: int | None) -> int:
    if device_index is None:   # the interpreter: one program at a time, no split pays
        return 1
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pow2_block(n: int, largest: int) -> int:
    return min(largest, max(MIN_DOT, triton.next_power_of_2(n)))


def _check(y: torch.Tensor, x: torch.Tensor, pages: torch.Tensor,
           module: PagedModuleLora) -> None:
    if x.dim() != 2 or y.dim() != 2 or pages.dim() != 2:
        raise ShapeError(f"sgmv_triton: expected 2-D y, x, pages, got y {tuple(y.shape)}, "
                         f"x {tuple(x.shape)}, pages {tuple(pages.shape)}")
    if x.shape != (y.shape[0], module.in_features) or y.shape[1] != module.out_features:
        raise ShapeError(f"sgmv_triton: expected x [T, {module.in_features}] and y "
                         f"[T, {module.out_features}], got x {tuple(x.shape)}, y {tuple(y.shape)}")
    if not (x.device == y.device == pages.device):
        raise ShapeError(f"sgmv_triton: expected y, x, pages on one device, got {y.device}, "
                         f"{x.device}, {pages.device}")
    if not (x.dtype == y.dtype == pages.dtype) or x.dtype not in DTYPES:
        raise ShapeError(f"sgmv_triton: expected x, y, pages of one dtype among {DTYPES}, got "
                         f"{x.dtype}, {y.dtype}, {pages.dtype}")
    hidden = pages.shape[1]
    for name, pages_per_row, features in (("a_pages_per_row", module.a_pages_per_row,
                                           module.in_features),
                                          ("b_pages_per_row", module.b_pages_per_row,
                                           module.out_features)):
        if pages_per_row * hidden < features:
            raise ShapeError(f"sgmv_triton: {name}={pages_per_row} pages of {hidden} cannot "
                             f"hold {features} features")
    for name in ("seg_rows", "seg_rank", "seg_scale", "seg_a", "seg_b", "page_ids"):
        index = getattr(module, name)
        dtype = torch.float32 if name == "seg_scale" else torch.int32
        if index.dtype != dtype or index.device != pages.device:
            raise ShapeError(f"sgmv_triton: module.{name} must be {dtype} on {pages.device}, "
                             f"got {index.dtype} on {index.device}")


def sgmv_triton(y: torch.Tensor, x: torch.Tensor, pages: torch.Tensor, module: PagedModuleLora,
                split_k: int | None = None) -> None:
    """y [T, out] += each segment's scaling * (x [T, in] @ A^T) @ B^T, A and B^T read from
    `pages [num_pages, H]` through `module`'s page table; rows in no segment are untouched.
    y, x and pages share one dtype (float32, float16 or bfloat16) and device; any strides.
    `split_k`: the shrink's number of K splits (None: sized to the device)."""
    _check(y, x, pages, module)
    num_segments = module.seg_rank.shape[0]
    if num_segments == 0 or module.max_rank == 0 or module.max_rows == 0 or y.shape[0] == 0:
        return
    interpret = _interpreting()
    shrink, expand = _kernels(interpret)
    hidden = pages.shape[1]
    seg_rows = module.seg_rows.contiguous()
    # 16-bit pools: tensor cores for x @ A^T (16-bit) and h @ B^T (TF32); float32 pools: IEEE.
    precision = "ieee" if pages.dtype == torch.float32 else "tf32"

    block_m = _pow2_block(module.max_rows, 64)
    row_blocks = triton.cdiv(module.max_rows, block_m)

    block_r = _pow2_block(module.max_rank, 64)
    block_k = _pow2_block(hidden, 64)
    k_blocks_per_page = triton.cdiv(hidden, block_k)
    num_k_blocks = module.a_pages_per_row * k_blocks_per_page
    rank_blocks = triton.cdiv(module.max_rank, block_r)
    if split_k is None:
        device_index = None if interpret else (pages.device.index or 0)
        programs = num_segments * row_blocks * rank_blocks
        split_k = triton.cdiv(PROGRAMS_PER_SM * _num_sms(device_index), programs)
    split_k = max(1, min(split_k, num_k_blocks))
    h = (torch.zeros if split_k > 1 else torch.empty)(
        y.shape[0], module.max_rank, dtype=torch.float32, device=pages.device)

    block_n = _pow2_block(hidden, 64)
    n_blocks_per_page = triton.cdiv(hidden, block_n)
    expand_rank_block = _pow2_block(module.max_rank, 32)

    # Launch on the tensors' GPU (triton launches on the current one); FP fusion on explicitly
    # (one rounding in y + scaling * acc; Triton 3.10 changes the default to off).
    on_device = (torch.cuda.device(pages.device) if pages.device.type == "cuda"
                 else contextlib.nullcontext())
    with on_device:
        shrink[(num_segments, row_blocks, rank_blocks * split_k)](
            x, pages, h, module.page_ids.contiguous(), seg_rows, module.seg_rank.contiguous(),
            module.seg_a.contiguous(),
            x.stride(0), x.stride(1), pages.stride(0), pages.stride(1), h.stride(0),
            module.in_features, hidden, module.a_pages_per_row, k_blocks_per_page, split_k,
            BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, ATOMIC=split_k > 1,
            PRECISION=precision,
            UPCAST=interpret and pages.dtype == torch.bfloat16, enable_fp_fusion=True)
        expand[(num_segments, row_blocks, module.b_pages_per_row * n_blocks_per_page)](
            y, pages, h, module.page_ids.contiguous(), seg_rows, module.seg_rank.contiguous(),
            module.seg_b.contiguous(), module.seg_scale.contiguous(),
            y.stride(0), y.stride(1), pages.stride(0), pages.stride(1), h.stride(0),
            module.out_features, hidden, module.b_pages_per_row, n_blocks_per_page,
            BLOCK_M=block_m, BLOCK_R=expand_rank_block, BLOCK_N=block_n,
            PRECISION=precision, enable_fp_fusion=True)
