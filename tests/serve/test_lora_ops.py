"""The torch fallback for batched LoRA (`sgmv_torch`, and its grouped and dense-masked paths
over the stacks `gather_segments` copies out of the pool) equals the per-row reference, for
random shapes, ranks, page layouts, base rows and rank-0 segments (hypothesis); with mixed
dtypes it equals the paged reference; and the shell hands each module to the batch's kernel."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lorafleet.serve.lora_batch import LoraBatch
from lorafleet.serve.lora_ops import (BatchedLoraLinear, PagedModuleLora, gather_segments,
                                      lora_delta_dense, lora_delta_grouped,
                                      lora_delta_paged_reference, lora_delta_reference,
                                      paged_weights, segment_mask, sgmv_torch)


def paged_batch(seed, page_size, in_features, out_features, runs, dtype):
    """(pages, module, x, y, row_weights): runs = [(rank or None for base rows, rows)], each
    adapter's pages scattered over a pool with unused pages; row_weights[i] = row i's
    (A, B^T, scaling) as the per-row reference takes them (None: no delta)."""
    gen = torch.Generator().manual_seed(seed)
    a_ppr, b_ppr = -(-in_features // page_size), -(-out_features // page_size)
    need = sum(rank * (a_ppr + b_ppr) for rank, _ in runs if rank)
    pages = torch.randn(need + 5, page_size, generator=gen, dtype=torch.float64).to(dtype)
    free = torch.randperm(need + 5, generator=gen).tolist()
    page_ids, seg_rows, ranks, seg_a, seg_b, row = [], [], [], [], [], 0
    for rank, rows in runs:
        if rank is not None:
            seg_a.append(len(page_ids))
            page_ids += [free.pop() for _ in range(rank * a_ppr)]
            seg_b.append(len(page_ids))
            page_ids += [free.pop() for _ in range(rank * b_ppr)]
            seg_rows.append((row, row + rows))
            ranks.append(rank)
        row += rows
    int32 = dict(dtype=torch.int32)
    scales = torch.rand(len(ranks), generator=gen) * 3 + 0.1
    module = PagedModuleLora(in_features, out_features, a_ppr, b_ppr,
                             torch.tensor(seg_rows, **int32).view(-1, 2),
                             torch.tensor(ranks, **int32), scales, torch.tensor(seg_a, **int32),
                             torch.tensor(seg_b, **int32), torch.tensor(page_ids, **int32),
                             max(ranks, default=0), max((e - s for s, e in seg_rows), default=0))
    row_weights = [None] * row
    for s, (start, end) in enumerate(seg_rows):
        if ranks[s]:                     # rank 0: the adapter does not adapt this module
            row_weights[start:end] = [paged_weights(pages, module, s)] * (end - start)
    x = torch.randn(row, in_features, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(row, out_features, generator=gen, dtype=torch.float64).to(dtype)
    return pages, module, x, y, row_weights


batches = st.tuples(
    st.integers(0, 2**16),
    st.sampled_from([4, 8, 16]),                            # page size (hidden size)
    st.integers(1, 40), st.integers(1, 40),                 # in, out: up to 10 pages per row
    st.lists(st.tuples(st.one_of(st.none(), st.integers(0, 9)), st.integers(1, 6)),
             min_size=1, max_size=8))


@settings(max_examples=60, deadline=None)
@given(batches)
def test_torch_paths_equal_row_reference(batch):
    pages, module, x, y, row_weights = paged_batch(*batch, dtype=torch.float64)
    expected = y + lora_delta_reference(x, module.out_features, row_weights)
    a, bt, segments = gather_segments(pages, module)
    grouped, dense, fallback = y.clone(), y.clone(), y.clone()
    lora_delta_grouped(grouped, x, a, bt, segments)
    lora_delta_dense(dense, x, a, bt, segment_mask(x.shape[0], segments, a.shape[0],
                                                   torch.float64, x.device))
    sgmv_torch(fallback, x, pages, module)       # whichever of the two the cost model picks
    for got in (grouped, dense, fallback):
        torch.testing.assert_close(got, expected)
        untouched = [i for i, w in enumerate(row_weights) if w is None]
        assert torch.equal(got[untouched], y[untouched])   # base rows, rank-0 segments: bits


@settings(max_examples=20, deadline=None)
@given(batches, st.sampled_from([(torch.float32, torch.bfloat16),
                                 (torch.bfloat16, torch.float32)]))
def test_torch_fallback_with_mixed_dtypes_equals_paged_reference(batch, dtypes):
    """x, y in one dtype and the pool in another (a 4-bit base computing in its own dtype)."""
    compute, pool = dtypes
    pages, module, x, y, _ = paged_batch(*batch, dtype=compute)
    pages = pages.to(pool)
    expected, got = y.clone(), y.clone()
    lora_delta_paged_reference(expected, x, pages, module)
    sgmv_torch(got, x, pages, module)
    assert got.dtype == compute
    scale = expected.float().abs().max().item() + 1
    tolerance = 1e-5 if compute == torch.float32 else 2 ** -6
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=tolerance * scale)


def test_fallback_derives_its_copy_plan_once_and_reads_the_pages_on_every_call():
    """A batch serves every step that keeps its composition: the page list and masks derived
    from its metadata are kept, the weights are read afresh."""
    pages, module, x, y, _ = paged_batch(7, 8, 20, 12, [(None, 1), (3, 2), (0, 1), (5, 3)],
                                         dtype=torch.float64)
    plan = module.copy_plan
    for _ in range(3):
        expected, got = y.clone(), y.clone()
        lora_delta_paged_reference(expected, x, pages, module)
        sgmv_torch(got, x, pages, module)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)   # reference: fp32
        pages.mul_(-1.5).add_(0.25)       # other weights on the same pages
    assert module.copy_plan is plan and [s.rank for s in plan.segments] == [3, 5]


def test_shell_hands_its_module_to_the_batch_kernel():
    pages, module, x, _, _ = paged_batch(3, 8, 12, 10, [(None, 2), (4, 3), (2, 1)],
                                         dtype=torch.float32)
    linear = nn.Linear(12, 10)
    shell = BatchedLoraLinear(linear, "proj")
    calls = []

    def kernel(y, x2d, pool, lora_module):
        calls.append(lora_module)
        lora_delta_paged_reference(y, x2d, pool, lora_module)

    batch = LoraBatch({"proj": module}, pages, kernel)
    expected = linear(x)
    lora_delta_paged_reference(expected, x, pages, module)
    torch.testing.assert_close(shell(x, batch), expected.detach())
    assert calls == [module]
    assert torch.equal(shell(x, LoraBatch({"other": module}, pages, kernel)), linear(x))
    # x in another dtype than the pool's: the torch fallback, not the kernel
    bf16_expected = linear.bfloat16()(x.bfloat16())
    lora_delta_paged_reference(bf16_expected, x.bfloat16(), pages, module)
    got = shell(x.bfloat16(), batch)
    assert calls == [module] and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), bf16_expected.float(), rtol=0.02, atol=0.05)


def test_reference_is_the_lora_formula():
    gen = torch.Generator().manual_seed(0)
    x, a, b = (torch.randn(3, 5, generator=gen), torch.randn(2, 5, generator=gen),
               torch.randn(4, 2, generator=gen))
    delta = lora_delta_reference(x, 4, [(a, b.t(), 0.5), None, (a, b.t(), 2.0)])
    torch.testing.assert_close(delta[0], 0.5 * (b @ a @ x[0]))
    torch.testing.assert_close(delta[2], 2.0 * (b @ a @ x[2]))
    assert not delta[1].any()
