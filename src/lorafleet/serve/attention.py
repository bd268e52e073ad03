"""Paged attention: the `AttentionBackend` (models/batch.py) the engine hands the model.

Keys and values live in the pool tensor `pages [num_pages, H]`, viewed as
`[num_pages, rows_per_page, kv_dim]` (kv_cache.py gives the layout). Per step the runner builds
one `PagedAttention` with the slots (page, row) every token reads and writes, for all layers at
once, so `attend` per layer is a few indexed copies and one scaled-dot-product attention:

- prefill (every sequence starts at position 0: no prefix caching, and a preempted sequence is
  recomputed from scratch): write the new K/V into their slots, then causal attention over each
  sequence's own tokens;
- decode (one new token per sequence): write it, gather each sequence's K/V from its pages into a
  `[B, max_len]` padded batch, one attention with a length mask.

Plain torch indexing, so the same code runs on CPU and CUDA.
"""
from __future__ import annotations

import torch

from lorafleet.models.layers import causal_attention

from .kv_cache import KVLayout


def kv_view(pages: torch.Tensor, layout: KVLayout) -> torch.Tensor:
    """pages [P, H] -> [P, rows_per_page, kv_dim], sharing storage (writes land in the pool)."""
    rows = layout.rows_per_page
    return pages.as_strided((pages.shape[0], rows, layout.kv_dim),
                            (pages.stride(0), layout.kv_dim, 1))


def token_slots(page_table: torch.Tensor, positions: torch.Tensor, layout: KVLayout):
    """Where tokens live. page_table [B, num_blocks * pages_per_block] (padded with any valid
    page), positions [B, N] -> (page [B, 2L, N], row [N] or [B, N]) for every (layer, K/V) plane
    in the order (2 * layer + k_or_v)."""
    B = page_table.shape[0]
    planes, group = 2 * layout.num_layers, layout.pages_per_group
    table = page_table.view(B, -1, planes, group).transpose(1, 2)     # [B, 2L, nb, group]
    offset = positions % layout.block_tokens
    block = positions // layout.block_tokens
    page = table[torch.arange(B)[:, None, None], torch.arange(planes)[None, :, None],
                 block[:, None, :], (offset // layout.rows_per_page)[:, None, :]]
    return page, offset % layout.rows_per_page


class PagedAttention:
    def __init__(self, kv: torch.Tensor, layout: KVLayout, seq_lens: list[int], is_prefill: bool,
                 page_tables: list[list[int]]):
        """kv: kv_view of the pool. seq_lens: each sequence's length after this step.
        page_tables: each sequence's pages (kv_cache.KVCacheManager.page_ids)."""
        self.kv, self.layout, self.is_prefill, self.seq_lens = kv, layout, is_prefill, seq_lens
        device = kv.device
        width = max(len(t) for t in page_tables)
        table = torch.tensor([t + [t[0]] * (width - len(t)) for t in page_tables], device=device)
        if is_prefill:
            # New tokens: every position of every sequence, flattened in batch order.
            max_len = max(seq_lens)
            positions = torch.arange(max_len, device=device).expand(len(seq_lens), max_len)
            page, row = token_slots(table, positions, layout)          # [B, 2L, max_len]
            valid = positions < torch.tensor(seq_lens, device=device)[:, None]
            self.write_page = page.transpose(0, 1)[:, valid]             # [2L, T]
            self.write_row = row[valid]                                  # [T]
            self.starts = [0]
            for n in seq_lens:
                self.starts.append(self.starts[-1] + n)
        else:
            lens = torch.tensor(seq_lens, device=device)
            page, row = token_slots(table, (lens - 1)[:, None], layout)   # [B, 2L, 1]
            self.write_page, self.write_row = page[:, :, 0].t(), row[:, 0]   # [2L, B], [B]
            max_len = int(max(seq_lens))
            positions = torch.arange(max_len, device=device)[None, :].expand(len(seq_lens), -1)
            self.read_page, self.read_row = token_slots(table, positions, layout)
            self.read_page = self.read_page.transpose(0, 1).contiguous()   # [2L, B, max_len]
            # When pages hold whole rows (H a multiple of kv_dim, the usual case) the pool is a
            # flat [P * rows_per_page, kv_dim] table and the gather is one index_select per
            # plane, several times faster on CPU than advanced indexing with (page, row).
            self.read_slot = None
            if kv.is_contiguous():
                self.read_slot = (self.read_page * layout.rows_per_page
                                  + self.read_row).view(self.read_page.shape[0], -1)
            self.mask = (positions < lens[:, None])[:, None, None, :]      # [B, 1, 1, max_len]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> torch.Tensor:
        """q [1, T, nh, hd], k/v [1, T, nkv, hd] -> [1, T, nh, hd]."""
        _, T, n_kv, head_dim = k.shape
        k_plane, v_plane = 2 * layer_idx, 2 * layer_idx + 1
        self.kv[self.write_page[k_plane], self.write_row] = k[0].reshape(T, -1).to(self.kv.dtype)
        self.kv[self.write_page[v_plane], self.write_row] = v[0].reshape(T, -1).to(self.kv.dtype)
        if self.is_prefill:
            return torch.cat([causal_attention(q[:, s:e], k[:, s:e], v[:, s:e], scale)
                              for s, e in zip(self.starts[:-1], self.starts[1:])], dim=1)
        B, max_len = self.read_row.shape
        if self.read_slot is not None:
            flat = self.kv.view(-1, self.kv.shape[-1])
            keys = flat.index_select(0, self.read_slot[k_plane]).view(B, max_len, n_kv, head_dim)
            values = flat.index_select(0, self.read_slot[v_plane]).view(B, max_len, n_kv,
                                                                         head_dim)
        else:   # the reference gather, also the path for rows that do not tile a page
            keys = self.kv[self.read_page[k_plane], self.read_row].view(B, max_len, n_kv,
                                                                        head_dim)
            values = self.kv[self.read_page[v_plane], self.read_row].view(B, max_len, n_kv,
                                                                          head_dim)
        return decode_attention(q[0], keys, values, self.mask, scale)[None]


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence against its padded keys. q [B, nh, hd], keys/values
    [B, L, nkv, hd], mask [B, 1, 1, L] (True = attend) -> [B, nh, hd].

    Written as two small batched matmuls with the query heads grouped by their KV head (GQA
    without copying K/V): on CPU this is several times faster than SDPA's masked kernel at
    decode shapes."""
    B, n_heads, head_dim = q.shape
    n_kv = keys.shape[2]
    grouped = q.view(B, n_kv, n_heads // n_kv, head_dim)               # [B, nkv, rep, hd]
    scores = torch.matmul(grouped, keys.permute(0, 2, 3, 1)).float() * scale   # [B, nkv, rep, L]
    scores.masked_fill_(~mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(values.dtype)
    out = torch.matmul(probs, values.transpose(1, 2))                 # [B, nkv, rep, hd]
    return out.reshape(B, n_heads, head_dim)
