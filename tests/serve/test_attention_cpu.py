"""The C paged decode-attention kernel (attention_cpu.py) equals the torch path it replaces
(gather the rows, then `decode_attention`), for GQA and MHA, ragged lengths, rows scattered over
the pool, float32 and bfloat16; PagedAttention takes it only where it applies."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.serve.attention import decode_attention
from lorafleet.serve.attention_cpu import decode_kernel_available, paged_decode_attention

pytestmark = pytest.mark.skipif(not decode_kernel_available(torch.zeros(1, 8)),
                                reason="the C kernel cannot be built here (no C compiler)")


def torch_path(q, kv_rows, k_slots, v_slots, lens, scale):
    B, max_len = k_slots.shape
    n_kv, head_dim = kv_rows.shape[1] // q.shape[2], q.shape[2]
    keys = kv_rows[k_slots.view(-1)].view(B, max_len, n_kv, head_dim)
    values = kv_rows[v_slots.view(-1)].view(B, max_len, n_kv, head_dim)
    mask = (torch.arange(max_len)[None, :] < lens[:, None])[:, None, None, :]
    return decode_attention(q, keys, values, mask, scale)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 6), st.sampled_from([(4, 4), (8, 2), (6, 1)]),
       st.sampled_from([8, 16, 24, 64]), st.integers(1, 40),
       st.sampled_from([torch.float32, torch.bfloat16]), st.sampled_from([1, 3]))
def test_kernel_equals_torch_path(seed, batch, heads, head_dim, max_len, dtype, threads):
    n_heads, n_kv = heads
    gen = torch.Generator().manual_seed(seed)
    rows = 3 * batch * max_len + 5
    kv_rows = torch.randn(rows, n_kv * head_dim, generator=gen).to(dtype)
    slots = torch.randperm(rows, generator=gen)[:2 * batch * max_len].view(2, batch, max_len)
    lens = torch.randint(1, max_len + 1, (batch,), generator=gen)
    q = (torch.randn(batch, n_heads, head_dim, generator=gen) * 2).to(dtype)
    scale = head_dim ** -0.5
    got = paged_decode_attention(q, kv_rows, slots[0].contiguous(), slots[1].contiguous(),
                                 lens, scale, threads)
    # the reference in float32 (the torch path in bf16 rounds its scores to bf16 first)
    expected = torch_path(q.float(), kv_rows.float(), slots[0], slots[1], lens, scale)
    assert got.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), expected, **tol)


def test_reads_only_each_sequence_own_length():
    """Rows past a sequence's length (NaN here) never reach its output."""
    kv_rows = torch.randn(20, 8)
    kv_rows[10:] = float("nan")
    k_slots = torch.tensor([[0, 1, 2, 10, 11], [3, 4, 12, 13, 14]])
    v_slots = torch.tensor([[5, 6, 7, 15, 16], [8, 9, 17, 18, 19]])
    lens = torch.tensor([3, 2])
    q = torch.randn(2, 2, 4)
    out = paged_decode_attention(q, kv_rows, k_slots, v_slots, lens, 0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch_path(q, kv_rows.nan_to_num(), k_slots, v_slots, lens,
                                               0.5))


def test_switch_and_unsupported_pools(monkeypatch):
    assert not decode_kernel_available(torch.zeros(4, 8).half())
    assert not decode_kernel_available(torch.zeros(4, 16)[:, ::2])     # not contiguous
    monkeypatch.setenv("LORAFLEET_ATTENTION_KERNEL", "0")
    assert not decode_kernel_available(torch.zeros(4, 8))
