"""Paged decode attention: the index_select gather (pages that hold whole K/V rows) and the
reference (page, row) gather give the same result, which equals plain attention over each
sequence's keys and values."""
import pytest
import torch

from lorafleet.serve.attention import PagedAttention, kv_view
from lorafleet.serve.kv_cache import KVLayout


@pytest.mark.parametrize("hidden", [64, 80])       # 80: rows do not tile a page (fallback)
def test_decode_gathers_agree_with_plain_attention(hidden):
    gen = torch.Generator().manual_seed(0)
    n_heads, n_kv, head_dim, layers = 4, 2, 16, 2
    layout = KVLayout(layers, n_kv * head_dim, hidden, block_tokens_hint=4)
    pages = torch.zeros(256, hidden, dtype=torch.float64)
    kv = kv_view(pages, layout)
    lens = [5, 9, 1]
    perm = torch.randperm(256, generator=gen).tolist()
    tables, used = [], 0
    for n in lens:
        count = layout.pages_for_tokens(n)
        tables.append(perm[used:used + count])
        used += count
    # Prefill every sequence's first n - 1 tokens, then decode its last one.
    history = {i: torch.randn(2, layers, n, n_kv, head_dim, generator=gen, dtype=torch.float64)
               for i, n in enumerate(lens)}
    prefill = PagedAttention(kv, layout, [n - 1 for n in lens if n > 1], True,
                             [t for t, n in zip(tables, lens) if n > 1])
    for layer in range(layers):
        k = torch.cat([history[i][0, layer, :n - 1] for i, n in enumerate(lens) if n > 1])[None]
        v = torch.cat([history[i][1, layer, :n - 1] for i, n in enumerate(lens) if n > 1])[None]
        q = torch.zeros(1, k.shape[1], n_heads, head_dim, dtype=torch.float64)
        prefill.attend(layer, q, k, v, 1.0)
    q = torch.randn(1, len(lens), n_heads, head_dim, generator=gen, dtype=torch.float64)
    k_new = torch.stack([history[i][0, :, n - 1] for i, n in enumerate(lens)], 1)  # [L, B, ..]
    v_new = torch.stack([history[i][1, :, n - 1] for i, n in enumerate(lens)], 1)
    outputs = {}
    for fast in (True, False):
        decode = PagedAttention(kv, layout, lens, False, tables)
        assert (decode.read_slot is not None) == (hidden % layout.kv_dim == 0)
        if not fast:
            decode.read_slot = None
        outputs[fast] = decode.attend(1, q, k_new[1][None], v_new[1][None], 0.25)[0]
    torch.testing.assert_close(outputs[True], outputs[False])
    for i, n in enumerate(lens):                        # oracle: softmax attention per head
        keys = history[i][0, 1].repeat_interleave(n_heads // n_kv, dim=1)   # [n, nh, hd]
        values = history[i][1, 1].repeat_interleave(n_heads // n_kv, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[0, i], keys) * 0.25
        expected = torch.einsum("hn,nhd->hd", scores.softmax(-1), values)
        torch.testing.assert_close(outputs[False][i], expected)
