"""The Triton SGMV kernels (shrink + expand reading pool pages in place) equal
`lora_delta_paged_reference`, run by the Triton interpreter on CPU tensors: random page layouts
with mixed ranks, 1-row and many-row segments, base rows between segments, `in` / `out` smaller
and larger than a page (several pages per row, partial last pages whose tails hold garbage),
shuffled page ids, split-K on and off, strided x and y; float32, float16 and bfloat16."""
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


def base_rows(module: PagedModuleLora, num_rows: int) -> list[int]:
    covered = set()
    for start, end in module.seg_rows.tolist():
        covered.update(range(start, end))
    return [t for t in range(num_rows) if t not in covered]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
def test_sgmv_equals_paged_reference(interpret, layout, dtype):
    in_features, out_features, runs = LAYOUTS[layout]
    module, pages, num_rows = make_module(in_features, out_features, runs, seed=layout,
                                          dtype=dtype)
    gen = torch.Generator().manual_seed(100 + layout)
    x = torch.randn(num_rows, in_features, generator=gen).to(dtype)
    y = torch.randn(num_rows, out_features, generator=gen).to(dtype)
    expected = y.clone()
    lora_delta_paged_reference(expected, x, pages, module)
    got = y.clone()
    sgmv_triton(got, x, pages, module, split_k=1 + layout % 3)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    else:   # one rounding of y either side; fp32 sums in another order may flip its last bit
        torch.testing.assert_close(got.float(), expected.float(), atol=2e-3, rtol=1e-2)
    rows = base_rows(module, num_rows)
    assert torch.equal(got[rows], y[rows])
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


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_kernels_compile_for_cuda(monkeypatch, dtype):
    """The compiled path the interpreter does not run (early returns, runtime-start loops,
    relaxed atomics, dot precisions) compiles for an H100 (sm_90) without a GPU, with the
    numerics the module docstring states: 16-bit shrink on 16-bit tensor cores, expand in TF32,
    float32 pools without tensor cores (IEEE)."""
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
    constants = {"_shrink": dict(BLOCK_M=16, BLOCK_R=32, BLOCK_K=64, SPLIT_K=4,
                                 PRECISION=precision, UPCAST=False),
                 "_expand": dict(BLOCK_M=16, BLOCK_R=16, BLOCK_N=64, PRECISION=precision)}
    mma = {}
    for kernel in (shrink, expand):
        kernel_constants = constants[kernel.fn.__name__]
        signature = {name: "constexpr" if name in kernel_constants
                     else f"*{dtype}" if name in io_ptrs
                     else "*fp32" if name in ("h_ptr", "seg_scale_ptr")
                     else "*i32" if name.endswith("_ptr") else "i32"
                     for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(kernel, signature, kernel_constants),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"enable_fp_fusion": True})
        mma[kernel.fn.__name__] = set(re.findall(r"mma\.\S*\.f32\.(\w+)\.\w+\.f32",
                                                 compiled.asm["ptx"]))
    if dtype == "fp32":
        assert mma == {"_shrink": set(), "_expand": set()}
    else:
        ptx_type = {"fp16": "f16", "bf16": "bf16"}[dtype]
        assert mma == {"_shrink": {ptx_type}, "_expand": {"tf32"}}


def test_triton_available(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_available(torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_available(torch.device("cpu"))
    assert triton_available(torch.device("cuda"))
