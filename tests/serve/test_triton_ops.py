"""The Triton SGMV kernels (shrink + expand reading pool pages in place) equal
`lora_delta_paged_reference`, run by the Triton interpreter on CPU tensors: random page layouts
with mixed ranks, 1-row and many-row segments, base rows between segments, rank-0 segments (left
bit for bit as they were), `in` / `out` smaller and larger than a page (several pages per row,
partial last pages whose tails hold garbage), shuffled page ids, split-K on and off, strided x
and y, element offsets past 2^31; float32, float16 and bfloat16. The compiled path is checked
by compiling for an H100 (sm_90) without a GPU: tensor-core instructions, atomics, int64
addressing.
"""
from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from lorafleet.errors import ShapeError  # noqa: E402
from lorafleet.serve.lora_ops import PagedModuleLora, lora_delta_paged_reference  # noqa: E402
from lorafleet.serve.triton_ops import sgmv_triton, triton_available  # noqa: E402

HIDDEN = 32   # a small page so that in / out of 20..96 give 1..3 pages per row

# (in_features, out_features, row runs: (rank or None for base rows, number of rows))
LAYOUTS = [
    (20, 24, [(4, 1), (None, 2), (32, 1), (1, 1), (None, 1), (8, 1)]),           # decode-like
    (24, 20, [(0, 2), (6, 1), (0, 1), (9, 3)]),   # rank 0: the adapter skips this module
    (80, 72, [(None, 3), (16, 37), (3, 1), (None, 5), (32, 70), (7, 2)]),        # prefill-like
    (48, 20, [(5, 9), (32, 1), (2, 17), (None, 4)]),
    (32, 96, [(1, 1), (12, 65), (None, 1), (31, 3)]),
    (36, 40, [(70, 3), (None, 1), (33, 2), (2, 1)]),   # ranks over one rank block (64 / 32)
]


def make_module(in_features: int, out_features: int, runs, seed: int, dtype: torch.dtype,
                hidden: int = HIDDEN) -> tuple[PagedModuleLora, torch.Tensor, int]:
    """A random pool [num_pages, hidden] and page table for `runs`; the last segment reuses the
    first one's pages (two segments of one adapter: a prefill and a decode group).
    -> (module, pages, number of rows); CPU tensors."""
    rng = random.Random(seed)
    a_pages_per_row = -(-in_features // hidden)
    b_pages_per_row = -(-out_features // hidden)
    ranks = [rank for rank, _ in runs if rank is not None]
    num_pages = sum(ranks) * (a_pages_per_row + b_pages_per_row) + 7
    order = list(range(num_pages))
    rng.shuffle(order)
    page_ids, seg_rows, seg_rank, seg_scale, seg_a, seg_b, row = [], [], [], [], [], [], 0
    for rank, num_rows in runs:
        if rank is not None:
            seg_rows.append((row, row + num_rows))
            seg_rank.append(rank)
            seg_scale.append(rng.choice([0.5, 1.0, 2.0, 0.125]))
            seg_a.append(len(page_ids))
            page_ids += [order.pop() for _ in range(rank * a_pages_per_row)]
            seg_b.append(len(page_ids))
            page_ids += [order.pop() for _ in range(rank * b_pages_per_row)]
        row += num_rows
    seg_rows.append((row, row + 2))                      # the first segment's adapter again
    seg_rank.append(seg_rank[0])
    seg_scale.append(seg_scale[0])
    seg_a.append(seg_a[0])
    seg_b.append(seg_b[0])
    row += 2
    gen = torch.Generator().manual_seed(seed)
    pages = (torch.randn(num_pages, hidden, generator=gen) / 4).to(dtype)   # tails: garbage

    def i32(values):
        return torch.tensor(values, dtype=torch.int32)

    module = PagedModuleLora(
        in_features=in_features, out_features=out_features, a_pages_per_row=a_pages_per_row,
        b_pages_per_row=b_pages_per_row, seg_rows=i32(seg_rows), seg_rank=i32(seg_rank),
        seg_scale=torch.tensor(seg_scale, dtype=torch.float32), seg_a=i32(seg_a),
        seg_b=i32(seg_b), page_ids=i32(page_ids), max_rank=max(seg_rank),
        max_rows=max(end - start for start, end in seg_rows))
    return module, pages, row


@pytest.fixture
def interpret(monkeypatch):
    """The Triton interpreter for this test only (triton reads the variable when it jits and
    launches, and sgmv_triton keeps one set of kernels per setting)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def untouched_rows(module: PagedModuleLora, num_rows: int) -> list[int]:
    """Rows that must keep their bits: in no segment, or in a segment of rank 0."""
    adapted = set()
    for (start, end), rank in zip(module.seg_rows.tolist(), module.seg_rank.tolist()):
        if rank > 0:
            adapted.update(range(start, end))
    return [t for t in range(num_rows) if t not in adapted]


def assert_bits_equal(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal values and equal signs of zero (y + 0.0 would turn -0.0 into +0.0)."""
    assert torch.equal(got, expected) and torch.equal(got.signbit(), expected.signbit())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
def test_sgmv_equals_paged_reference(interpret, layout, dtype):
    in_features, out_features, runs = LAYOUTS[layout]
    module, pages, num_rows = make_module(in_features, out_features, runs, seed=layout,
                                          dtype=dtype)
    gen = torch.Generator().manual_seed(100 + layout)
    x = torch.randn(num_rows, in_features, generator=gen).to(dtype)
    y = torch.randn(num_rows, out_features, generator=gen).to(dtype)
    rows = untouched_rows(module, num_rows)
    y[rows, ::3] = -0.0
    expected = y.clone()
    lora_delta_paged_reference(expected, x, pages, module)
    got = y.clone()
    sgmv_triton(got, x, pages, module, split_k=1 + layout % 3)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    else:   # one rounding of y either side; fp32 sums in another order may flip its last bit
        torch.testing.assert_close(got.float(), expected.float(), atol=2e-3, rtol=1e-2)
    assert_bits_equal(got[rows], y[rows])
    assert not torch.equal(got, y)


@pytest.mark.parametrize("split_k", [None, 1, 2, 7])
def test_sgmv_strided_operands_and_split_k(interpret, split_k):
    """x a row-strided view, y a column slice with a transposed layout: handled by strides.
    A page of 96 is two K / N tiles of 64, the second one partial. split_k None is the
    automatic choice; 7 exceeds the K blocks (3 pages x 2) and is clamped."""
    in_features, out_features, runs = 200, 150, [(6, 3), (None, 2), (17, 20), (2, 1)]
    module, pages, num_rows = make_module(in_features, out_features, runs, seed=9,
                                          dtype=torch.float32, hidden=96)
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2 * num_rows, in_features + 5, generator=gen)[::2, 3:3 + in_features]
    y_storage = torch.randn(out_features + 4, num_rows, generator=gen)
    y = y_storage.t()[:, 1:1 + out_features]
    assert not x.is_contiguous() and y.stride(1) != 1
    expected = y.clone()
    lora_delta_paged_reference(expected, x, pages, module)
    before = y_storage.clone()
    sgmv_triton(y, x, pages, module, split_k=split_k)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    untouched = torch.ones_like(y_storage, dtype=torch.bool)
    untouched[1:1 + out_features] = False
    assert torch.equal(y_storage[untouched], before[untouched])


def test_sgmv_rejects_mismatched_operands(interpret):
    module, pages, num_rows = make_module(20, 24, [(4, 2)], seed=0, dtype=torch.float32)
    x = torch.randn(num_rows, 20)
    with pytest.raises(ShapeError, match="dtype"):
        sgmv_triton(torch.zeros(num_rows, 24, dtype=torch.bfloat16), x, pages, module)
    with pytest.raises(ShapeError, match="x \\[T, 20\\]"):
        sgmv_triton(torch.zeros(num_rows, 24), x[:, :19], pages, module)
    module.seg_a = module.seg_a.long()
    with pytest.raises(ShapeError, match="seg_a"):
        sgmv_triton(torch.zeros(num_rows, 24), x, pages, module)


def _reserve(numel: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """torch.empty of `numel` elements: a virtual reservation, only what is written gets
    memory. Skips the test where the OS (strict overcommit) or the GPU refuses it."""
    try:
        return torch.empty(numel, dtype=dtype, device=device)
    except RuntimeError as error:
        pytest.skip(f"cannot reserve {numel} elements of {dtype} on {device}: {error}")


def past_int32_case(dtype: torch.dtype, device: str = "cpu"):
    """Operands whose element offsets pass 2^31, as in a production pool (1M pages of 8192 is
    2^33 elements): A and B^T on pages whose id * HIDDEN > 2^31 at the top of a pool of 2^31+
    elements, and x and y views of one storage with a column stride S such that the last column
    * S > 2^31. Only the used pages and elements are written (2 x 4.3 GB reserved in 16 bits).
    -> (y, x, pages, module, y_before, expected y)."""
    in_features, out_features = 40, 36
    module, small_pages, num_rows = make_module(in_features, out_features,
                                                [(3, 2), (None, 1), (5, 1)], seed=3, dtype=dtype)
    gen = torch.Generator().manual_seed(4)
    x_small = torch.randn(num_rows, in_features, generator=gen).to(dtype)
    y_before = torch.randn(num_rows, out_features, generator=gen).to(dtype)
    expected = y_before.clone()
    lora_delta_paged_reference(expected, x_small, small_pages, module)

    first_page = 2**31 // HIDDEN + 1
    pages = _reserve((first_page + small_pages.shape[0]) * HIDDEN, dtype, device)
    pages = pages.view(-1, HIDDEN)
    pages[first_page:] = small_pages.to(device)
    module.page_ids += first_page            # ids of ~2^26 are int32 still; id * HIDDEN is not
    stride = 2**31 // (min(in_features, out_features) - 1) + 1
    storage = _reserve((max(in_features, out_features) - 1) * stride + 2 * num_rows, dtype,
                       device)
    x = storage.as_strided((num_rows, in_features), (1, stride))
    y = storage.as_strided((num_rows, out_features), (1, stride), num_rows)   # disjoint from x
    x.copy_(x_small)
    for name in ("seg_rows", "seg_rank", "seg_scale", "seg_a", "seg_b", "page_ids"):
        setattr(module, name, getattr(module, name).to(device))
    return y, x, pages, module, y_before.to(device), expected.to(device)


@pytest.mark.parametrize("split_k", [1, 3])
def test_sgmv_offsets_past_int32(interpret, split_k):
    """The interpreter computes int32 products in int32 as the GPU does, so an index multiplied
    by a stride in int32 would read (or write) far from the right element."""
    y, x, pages, module, y_before, expected = past_int32_case(torch.float16)
    y.copy_(y_before)
    sgmv_triton(y, x, pages, module, split_k=split_k)
    torch.testing.assert_close(y.contiguous().float(), expected.float(), atol=2e-3, rtol=1e-2)


def test_split_k_is_not_a_jit_specialization(interpret, monkeypatch):
    """The automatic split_k follows the number of segments, which changes from one decode step
    to the next; as a constexpr each new value would be a JIT compile in the serving loop. The
    launches' constexprs (Triton's compile key, with the dtypes) are the same for any split_k > 1
    (the integer arguments are specialized only on == 1 and % 16)."""
    from lorafleet.serve import triton_ops

    launched = [set(), set()]   # shrink, expand: the constexpr keyword arguments of each launch
    kernels = triton_ops._kernels(True)

    class Recorder:
        def __init__(self, index):
            self.index = index

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched[self.index].add(tuple(sorted(kwargs.items())))
                kernels[self.index][grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(triton_ops, "_kernels", lambda interpret: (Recorder(0), Recorder(1)))
    module, pages, num_rows = make_module(200, 40, [(6, 2), (None, 1), (17, 3)], seed=5,
                                          dtype=torch.float32)   # 7 pages per A row: 7 K blocks
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(num_rows, 200, generator=gen)
    y = torch.randn(num_rows, 40, generator=gen)
    expected = y.clone()
    lora_delta_paged_reference(expected, x, pages, module)
    for split_k in (2, 3, 5, 7):
        got = y.clone()
        sgmv_triton(got, x, pages, module, split_k=split_k)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert len(launched[0]) == 1 and len(launched[1]) == 1


# The compiled kernels' tile corners: decode (a few rows, ranks <= 16: 16-wide tiles, split-K
# atomics, mma.sync) and prefill with ranks of 64..128 (64-row tiles: wgmma on sm_90), with and
# without atomics (one short prefill segment alone in a step is split).
CORNERS = {"decode": (dict(BLOCK_M=16, BLOCK_R=16, BLOCK_K=64, ATOMIC=True),
                      dict(BLOCK_M=16, BLOCK_R=16, BLOCK_N=64)),
           "prefill": (dict(BLOCK_M=64, BLOCK_R=64, BLOCK_K=64, ATOMIC=False),
                       dict(BLOCK_M=64, BLOCK_R=32, BLOCK_N=64)),
           "short_prefill": (dict(BLOCK_M=64, BLOCK_R=32, BLOCK_K=64, ATOMIC=True),
                             dict(BLOCK_M=64, BLOCK_R=32, BLOCK_N=64))}


@pytest.mark.parametrize("corner", list(CORNERS))
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_kernels_compile_for_cuda(monkeypatch, dtype, corner):
    """The compiled path the interpreter does not run (early returns, runtime-start loops,
    relaxed atomics, dot precisions) compiles for an H100 (sm_90) without a GPU, with the
    numerics the module docstring states: 16-bit shrink on 16-bit tensor cores, expand in TF32,
    float32 pools without tensor cores (IEEE); split-K partial sums as relaxed float32 atomic
    adds, only when ATOMIC; and every x / y / pages address offset in int64 (checked where their
    pointer type is not h's float32)."""
    pytest.importorskip("triton.backends.nvidia")
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lorafleet.serve import triton_ops

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    shrink, expand = triton_ops._kernels(False)
    io_ptrs = {"x_ptr", "y_ptr", "pages_ptr"}
    precision = "ieee" if dtype == "fp32" else "tf32"
    shrink_constants, expand_constants = CORNERS[corner]
    asm = {}
    for kernel, constants in ((shrink, dict(shrink_constants, UPCAST=False)),
                              (expand, expand_constants)):
        constants = dict(constants, PRECISION=precision)
        signature = {name: "constexpr" if name in constants
                     else f"*{dtype}" if name in io_ptrs
                     else "*fp32" if name in ("h_ptr", "seg_scale_ptr")
                     else "*i32" if name.endswith("_ptr") else "i32"
                     for name in kernel.arg_names}
        asm[kernel.fn.__name__] = triton.compile(ASTSource(kernel, signature, constants),
                                                 target=GPUTarget("cuda", 90, 32),
                                                 options={"enable_fp_fusion": True}).asm
    mma = {name: set(re.findall(r"mma(?:_async)?\.sync\.aligned\.m\d+n\d+k\d+(?:\.row\.col)?"
                                r"\.f32\.(\w+)\.", code["ptx"]))
           for name, code in asm.items()}
    if dtype == "fp32":
        assert mma == {"_shrink": set(), "_expand": set()}
    else:
        ptx_type = {"fp16": "f16", "bf16": "bf16"}[dtype]
        assert mma == {"_shrink": {ptx_type}, "_expand": {"tf32"}}
    atomics = {name: bool(re.search(r"(red|atom)\.global\.gpu\.relaxed\.add\.f32", code["ptx"]))
               for name, code in asm.items()}
    assert atomics == {"_shrink": shrink_constants["ATOMIC"], "_expand": False}
    if dtype != "fp32":
        ttir_type = {"fp16": "f16", "bf16": "bf16"}[dtype]
        narrow = [line.strip() for code in asm.values() for line in code["ttir"].splitlines()
                  if re.search(rf"tt\.addptr .*!tt\.ptr<{ttir_type}>>, tensor<\S*xi32>", line)]
        assert not narrow, narrow


def test_triton_available(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_available(torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_available(torch.device("cpu"))
    assert triton_available(torch.device("cuda"))
