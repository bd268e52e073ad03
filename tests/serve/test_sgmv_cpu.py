"""The C kernel for batched heterogeneous LoRA (sgmv_cpu.py) equals the paged reference
(lora_ops.lora_delta_paged_reference) for random page layouts: mixed ranks, rows spanning several
pages and partial last pages, segments of one and of many rows (across the kernel's row blocks),
base rows between segments, strided rows; float32 and bfloat16. And it falls back cleanly."""
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.serve import sgmv_cpu as kernel_module
from lorafleet.serve.lora_ops import PagedModuleLora, lora_delta_paged_reference, paged_weights
from lorafleet.serve.sgmv_cpu import VARIANTS, sgmv_cpu, sgmv_cpu_available


def cdiv(a, b):
    return -(-a // b)


def random_layout(seed, page_size, in_features, out_features, segments, dtype):
    """(pages, module, x, y): segments = [(rank, rows, base rows before it)], page ids shuffled
    over a pool with unused pages."""
    gen = torch.Generator().manual_seed(seed)
    a_ppr, b_ppr = cdiv(in_features, page_size), cdiv(out_features, page_size)
    need = sum(rank * (a_ppr + b_ppr) for rank, _, _ in segments)
    pages = torch.randn(need + 7, page_size, generator=gen).to(dtype)
    free = torch.randperm(need + 7, generator=gen).tolist()
    page_ids, seg_rows, seg_a, seg_b, row = [], [], [], [], 0
    for rank, rows, gap in segments:
        row += gap
        seg_a.append(len(page_ids))
        page_ids += [free.pop() for _ in range(rank * a_ppr)]
        seg_b.append(len(page_ids))
        page_ids += [free.pop() for _ in range(rank * b_ppr)]
        seg_rows.append((row, row + rows))
        row += rows
    num_rows = row + 1                                       # and a base row at the end
    # (rank 0: the segment's adapter does not adapt this module)
    ranks = [rank for rank, _, _ in segments]
    scales = torch.rand(len(segments), generator=gen) * 2
    int32 = dict(dtype=torch.int32)
    module = PagedModuleLora(in_features, out_features, a_ppr, b_ppr,
                             torch.tensor(seg_rows, **int32), torch.tensor(ranks, **int32),
                             scales, torch.tensor(seg_a, **int32), torch.tensor(seg_b, **int32),
                             torch.tensor(page_ids, **int32), max(ranks),
                             max(rows for _, rows, _ in segments))
    # x and y with strided rows (a view of wider tensors), as the runner may pass them
    x = torch.randn(num_rows, in_features + 3, generator=gen).to(dtype)[:, 2:in_features + 2]
    y = torch.randn(num_rows, out_features + 5, generator=gen).to(dtype)[:, :out_features]
    return pages, module, x, y


layouts = st.tuples(
    st.integers(0, 2**16),
    st.sampled_from([8, 16, 24]),                           # page size (hidden size)
    st.integers(1, 60), st.integers(1, 60),                 # in, out: 1 to 8 pages per row
    st.lists(st.tuples(st.integers(0, 40), st.integers(1, 40), st.integers(0, 2)),
             min_size=1, max_size=6))

pytestmark = pytest.mark.skipif(not sgmv_cpu_available(torch.zeros(1)),
                                reason="the C kernel cannot be built here (no C compiler)")


@settings(max_examples=80, deadline=None)
@given(layouts, st.sampled_from([torch.float32, torch.bfloat16]),
       st.sampled_from(list(VARIANTS)), st.sampled_from([1, 3]))
def test_kernel_equals_paged_reference(layout, dtype, variant, threads):
    """Every build of the kernel: this CPU's, AVX-512 without BF16, portable C; one thread and
    several (work split in chunks of 16 rows, a segment may span threads)."""
    if kernel_module._load(variant) is None:
        pytest.skip(f"the {variant} build is not possible here")
    pages, module, x, y = random_layout(*layout, dtype=dtype)
    expected, got = y.clone(), y.clone()
    lora_delta_paged_reference(expected, x, pages, module)
    sgmv_cpu(got, x, pages, module, variant, threads)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    else:   # one bf16 rounding of the result each, and the kernel's h = x A^T rounded to bf16
        # before the expand (as PEFT's bf16 lora_A output is): |error| <= 2^-7 |y'| +
        # 2^-8 scaling |h| |B^T| per row, plus fp32 summation-order noise
        bound = 2**-7 * expected.float().abs() + 1e-4
        for seg in range(module.seg_rank.shape[0]):
            a, bt, scaling = paged_weights(pages, module, seg)
            start, end = module.seg_rows[seg].tolist()
            h = x[start:end].float() @ a.float().t()
            bound[start:end] += 2**-8 * abs(scaling) * (h.abs() @ bt.float().abs())
        assert ((got.float() - expected.float()).abs() <= bound).all()
    covered = torch.zeros(y.shape[0], dtype=torch.bool)
    for start, end in module.seg_rows.tolist():
        covered[start:end] = True
    assert torch.equal(got[~covered], y[~covered])           # base rows untouched


def test_kernel_adds_the_lora_formula():
    """One segment of two rows against the formula itself, y + s * x A^T B^T."""
    pages, module, x, y = random_layout(3, 16, 20, 12, [(5, 2, 1)], torch.float32)
    got = y.clone()
    sgmv_cpu(got, x, pages, module)
    ids = module.page_ids.long()
    a = pages[ids[:10]].view(5, 32)[:, :20]
    bt = pages[ids[10:]].view(5, 16)[:, :12]
    scale = float(module.seg_scale[0])
    torch.testing.assert_close(got[1:3], y[1:3] + scale * (x[1:3] @ a.t()) @ bt)
    assert torch.equal(got[[0, 3]], y[[0, 3]])


def test_kernel_rejects_mismatched_dtypes():
    pages, module, x, y = random_layout(1, 8, 8, 8, [(2, 1, 0)], torch.float32)
    with pytest.raises(ValueError, match="must be the pool's"):
        sgmv_cpu(y.bfloat16(), x, pages, module)


def test_falls_back_cleanly(tmp_path, monkeypatch, caplog):
    pages = torch.zeros(4, 8)
    monkeypatch.setenv("LORAFLEET_SGMV_KERNEL", "0")
    assert not sgmv_cpu_available(pages)
    monkeypatch.delenv("LORAFLEET_SGMV_KERNEL")
    assert not sgmv_cpu_available(pages.half())              # no float16 kernel
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")                   # a compiler that fails
    kernel_module._load.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="lorafleet.serve"):
            assert not sgmv_cpu_available(pages)
        assert "SGMV kernel unavailable" in caplog.text
    finally:
        kernel_module._load.cache_clear()
