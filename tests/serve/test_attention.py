"""Paged attention over mixed steps (decode rows, whole prompts, chunks of prompts whose earlier
chunks are in the pages) equals plain causal softmax attention over each sequence's keys and
values; the index_select gather (pages that hold whole K/V rows) and the reference (page, row)
gather agree."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.serve.attention import PagedAttention, chunk_attention, kv_view
from lorafleet.serve.kv_cache import KVLayout

N_HEADS, N_KV, HEAD_DIM, LAYERS = 4, 2, 16, 2
NUM_PAGES = 512


def reference_attention(q, keys, values, start, scale):
    """q [Q, nh, hd] at positions start .. start + Q - 1, keys/values [L, nkv, hd]: query i
    reads keys 0 .. start + i, softmax per head. -> [Q, nh, hd]."""
    keys = keys.repeat_interleave(N_HEADS // N_KV, dim=1)           # [L, nh, hd]
    values = values.repeat_interleave(N_HEADS // N_KV, dim=1)
    scores = torch.einsum("qhd,lhd->hql", q, keys) * scale
    visible = torch.arange(keys.shape[0])[None, :] <= start + torch.arange(q.shape[0])[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hql,lhd->qhd", scores.softmax(-1), values)


def run_steps(hidden, steps, seed=0, flat=True):
    """Run the same sequences through several steps: steps[s][i] is how many new tokens
    sequence i runs in step s (0: not in that step). Checks every output against the
    reference; returns the last step's output [T, nh, hd]."""
    gen = torch.Generator().manual_seed(seed)
    layout = KVLayout(LAYERS, N_KV * HEAD_DIM, hidden, block_tokens_hint=4)
    pages = torch.zeros(NUM_PAGES, hidden, dtype=torch.float64)
    kv = kv_view(pages, layout)
    totals = [sum(step[i] for step in steps) for i in range(len(steps[0]))]
    perm = torch.randperm(NUM_PAGES, generator=gen).tolist()    # scattered pages
    tables, used = [], 0
    for n in totals:
        count = layout.pages_for_tokens(n)
        tables.append(perm[used:used + count])
        used += count
    # Every sequence's K, V and Q for all its positions, every layer: [L, n, heads, hd].
    k_all = [torch.randn(LAYERS, n, N_KV, HEAD_DIM, generator=gen, dtype=torch.float64)
             for n in totals]
    v_all = [torch.randn(LAYERS, n, N_KV, HEAD_DIM, generator=gen, dtype=torch.float64)
             for n in totals]
    q_all = [torch.randn(LAYERS, n, N_HEADS, HEAD_DIM, generator=gen, dtype=torch.float64)
             for n in totals]
    done = [0] * len(totals)
    for step in steps:
        batch = [i for i, n in enumerate(step) if n]
        attention = PagedAttention(kv, layout, [step[i] for i in batch],
                                   [done[i] + step[i] for i in batch], [tables[i] for i in batch])
        if not flat:
            for gather in [attention.decode] + [c[3] for c in attention.chunks]:
                if gather is not None:
                    gather.flat = False
        for layer in range(LAYERS):
            q, k, v = (torch.cat([t[i][layer, done[i]:done[i] + step[i]] for i in batch])[None]
                       for t in (q_all, k_all, v_all))           # this step's new tokens
            out = attention.attend(layer, q, k, v, 0.25)[0]
            first = 0
            for i in batch:
                end = done[i] + step[i]
                expected = reference_attention(q_all[i][layer, done[i]:end],
                                               k_all[i][layer, :end], v_all[i][layer, :end],
                                               done[i], 0.25)
                # decode_attention takes its softmax in float32 (as for bf16 pools)
                torch.testing.assert_close(out[first:first + step[i]], expected, rtol=1e-5,
                                           atol=1e-5)
                first += step[i]
        for i in batch:
            done[i] += step[i]
    return out


# Six sequences: a prompt in one step then decoding; a prompt in three chunks (chunk, chunk,
# last chunk) beside decode rows; a one-token prompt; a late arrival.
STEPS = [
    [5, 4, 0, 1, 0, 9],
    [1, 3, 6, 1, 0, 1],
    [1, 5, 1, 1, 0, 1],
    [1, 1, 7, 0, 2, 1],
]


@pytest.mark.parametrize("hidden", [64, 80])       # 80: rows do not tile a page (fallback)
def test_mixed_steps_match_reference(hidden):
    layout = KVLayout(LAYERS, N_KV * HEAD_DIM, hidden, block_tokens_hint=4)
    assert (layout.rows_per_page * layout.kv_dim == hidden) == (hidden == 64)
    fast = run_steps(hidden, STEPS)
    reference = run_steps(hidden, STEPS, flat=False)
    torch.testing.assert_close(fast, reference)


def test_pure_decode_and_pure_prefill_steps():
    run_steps(64, [[3, 7, 1], [1, 1, 1], [1, 1, 1]])        # all-prefill, then all-decode
    run_steps(64, [[2, 5], [9, 6]])                         # two chunks per sequence


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 9), min_size=3, max_size=3), min_size=1, max_size=4),
       st.sampled_from([64, 80]))
def test_any_split_matches_reference(steps, hidden):
    """However the tokens of three sequences are split over steps (chunks of any length, one
    token, or absent), each output equals attention over the sequence's whole prefix."""
    steps = [step for step in steps if any(step)] or [[1, 1, 1]]
    for i in range(3):                        # every sequence runs at least once
        if not any(step[i] for step in steps):
            steps[0][i] = 1
    run_steps(hidden, steps)


def test_chunk_attention_without_context_is_causal_attention():
    from lorafleet.models.layers import causal_attention

    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 6, N_HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(1, 6, N_KV, HEAD_DIM, generator=gen)
    v = torch.randn(1, 6, N_KV, HEAD_DIM, generator=gen)
    torch.testing.assert_close(chunk_attention(q, k, v, 0, 0.3), causal_attention(q, k, v, 0.3))
    # A chunk from position 2 on gives those rows of the whole sequence's causal attention.
    out = chunk_attention(q[:, 2:], k, v, 2, 0.3)
    torch.testing.assert_close(out, causal_attention(q, k, v, 0.3)[:, 2:])
