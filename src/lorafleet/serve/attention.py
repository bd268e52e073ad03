"""Paged attention: the `AttentionBackend` (models/batch.py) the engine hands the model.

Keys and values live in the pool tensor `pages [num_pages, H]`, viewed as
`[num_pages, rows_per_page, kv_dim]` (kv_cache.py gives the layout). Per step the runner builds
one `PagedAttention` with the slots (page, row) every token reads and writes, for all layers at
once, so `attend` per layer is a few indexed copies and the attention itself.

A step runs, for each sequence, `query_len` new tokens at the end of its `context_len` tokens
(its length after the step): a whole prompt (no cached context), a chunk of a long prompt (the
earlier chunks' K/V are in its pages), or one decode token. Tokens are flattened in batch order.
`attend` writes the new K/V into their slots, then:

- decode rows (query length 1), all together: gather each one's K/V from its pages into a
  `[B, max_len]` padded batch, one grouped-GQA attention with a length mask (`decode_attention`);
- longer queries one sequence at a time (a step holds few): causal attention over the new tokens
  alone when there is no cached context (no gather), else gather the context from the pages and
  let query i (position start + i) read keys 0..start + i (`chunk_attention`).

Plain torch indexing, so the same code runs on CPU and CUDA; on CPU the decode rows take a C
kernel that reads K/V in place instead (attention_cpu.py; the torch path is its tested twin).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafleet.models.layers import causal_attention

from .attention_cpu import decode_kernel_available, paged_decode_attention
from .kv_cache import KVLayout


def kv_view(pages: torch.Tensor, layout: KVLayout) -> torch.Tensor:
    """pages [P, H] -> [P, rows_per_page, kv_dim], sharing storage (writes land in the pool)."""
    rows = layout.rows_per_page
    return pages.as_strided((pages.shape[0], rows, layout.kv_dim),
                            (pages.stride(0), layout.kv_dim, 1))


def token_slots(page_table: torch.Tensor, positions: torch.Tensor, layout: KVLayout):
    """Where tokens live. page_table [B, num_blocks * pages_per_block] (padded with any valid
    page), positions [B, N] -> (page [B, 2L, N], row [B, N]) for every (layer, K/V) plane
    in the order (2 * layer + k_or_v)."""
    B = page_table.shape[0]
    planes, group = 2 * layout.num_layers, layout.pages_per_group
    table = page_table.view(B, -1, planes, group).transpose(1, 2)     # [B, 2L, nb, group]
    offset = positions % layout.block_tokens
    block = positions // layout.block_tokens
    page = table[torch.arange(B)[:, None, None], torch.arange(planes)[None, :, None],
                 block[:, None, :], (offset // layout.rows_per_page)[:, None, :]]
    return page, offset % layout.rows_per_page


class KVGather:
    """Reads the K or V rows of fixed (sequence, position) pairs, any layer: the slots are
    computed once per step, each `read` is one gather."""

    def __init__(self, kv: torch.Tensor, layout: KVLayout, page_table: torch.Tensor,
                 positions: torch.Tensor):
        """page_table [B, width], positions [B, N] (any valid position where padded)."""
        page, self.row = token_slots(page_table, positions, layout)   # [B, 2L, N], [B, N]
        self.page = page.transpose(0, 1).contiguous()                 # [2L, B, N]
        # When pages hold whole rows (H a multiple of kv_dim, the usual case) the pool is a
        # flat [P * rows_per_page, kv_dim] table and the gather is one index_select per
        # plane, several times faster on CPU than advanced indexing with (page, row).
        # Set `flat` to False to take the reference (page, row) gather (tests hold them equal).
        self.flat = kv.is_contiguous()
        self.slot = (self.page * layout.rows_per_page + self.row).view(self.page.shape[0], -1)

    def read(self, kv: torch.Tensor, plane: int) -> torch.Tensor:
        """-> [B, N, kv_dim] of plane `plane` (= 2 * layer + k_or_v)."""
        B, N = self.row.shape
        if self.flat:
            return kv.view(-1, kv.shape[-1]).index_select(0, self.slot[plane]).view(B, N, -1)
        return kv[self.page[plane], self.row]


class PagedAttention:
    def __init__(self, kv: torch.Tensor, layout: KVLayout, query_lens: list[int],
                 context_lens: list[int], page_tables: list[list[int]]):
        """kv: kv_view of the pool. Sequence i runs query_lens[i] new tokens, at positions
        context_lens[i] - query_lens[i] .. context_lens[i] - 1 (context_lens: its length after
        this step). page_tables: each sequence's pages (kv_cache.KVCacheManager.page_ids)."""
        self.kv, self.layout = kv, layout
        device = kv.device
        width = max(len(t) for t in page_tables)
        table = torch.tensor([t + [t[0]] * (width - len(t)) for t in page_tables], device=device)
        q_lens = torch.tensor(query_lens, device=device)
        starts = torch.tensor(context_lens, device=device) - q_lens
        # New tokens: written to their slots, flattened in batch order.
        max_q = max(query_lens)
        offsets = torch.arange(max_q, device=device)[None, :]
        valid = offsets < q_lens[:, None]                                  # [B, max_q]
        positions = torch.where(valid, starts[:, None] + offsets, 0)
        page, row = token_slots(table, positions, layout)                  # [B, 2L, max_q]
        self.write_page = page.transpose(0, 1)[:, valid]                   # [2L, T]
        self.write_row = row[valid]                                        # [T]

        token_start = [0]
        for n in query_lens:
            token_start.append(token_start[-1] + n)
        decode = [i for i, n in enumerate(query_lens) if n == 1]
        # Decode rows: one padded gather for all of them. `decode_tokens` is None when every
        # row is one (a pure decode step: outputs already in token order).
        self.decode, self.decode_tokens = None, None
        if decode:
            lens = torch.tensor([context_lens[i] for i in decode], device=device)
            max_len = int(lens.max())
            read_pos = torch.arange(max_len, device=device)[None, :].expand(len(decode), -1)
            self.decode = KVGather(kv, layout, table[decode], read_pos)
            self.decode_lens = lens
            # CPU: the C kernel reads K/V rows in place (attention_cpu.py); else the gather,
            # which alone needs the padding mask
            self.decode_kernel = self.decode.flat and decode_kernel_available(kv)
            if not self.decode_kernel:
                self.mask = (read_pos < lens[:, None])[:, None, None, :]   # [Bd, 1, 1, max_len]
            if len(decode) < len(query_lens):
                self.decode_tokens = torch.tensor([token_start[i] for i in decode], device=device)
        # Longer queries: (first token, end token, first position, gather of its context or
        # None when it has none and reads only its own new K/V).
        self.chunks = []
        for i, n in enumerate(query_lens):
            if n == 1:
                continue
            start = context_lens[i] - n
            gather = None
            if start > 0:
                read_pos = torch.arange(context_lens[i], device=device)[None, :]
                gather = KVGather(kv, layout, table[i:i + 1], read_pos)
            self.chunks.append((token_start[i], token_start[i + 1], start, gather))

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> torch.Tensor:
        """q [1, T, nh, hd], k/v [1, T, nkv, hd] -> [1, T, nh, hd]."""
        _, T, n_kv, head_dim = k.shape
        k_plane, v_plane = 2 * layer_idx, 2 * layer_idx + 1
        self.kv[self.write_page[k_plane], self.write_row] = k[0].reshape(T, -1).to(self.kv.dtype)
        self.kv[self.write_page[v_plane], self.write_row] = v[0].reshape(T, -1).to(self.kv.dtype)
        if self.decode is not None and self.decode_tokens is None:
            return self._decode(q[0], k_plane, v_plane, n_kv, head_dim, scale)[None]
        out = torch.empty_like(q[0])
        if self.decode is not None:
            rows = self._decode(q[0].index_select(0, self.decode_tokens), k_plane, v_plane, n_kv,
                                head_dim, scale)
            out.index_copy_(0, self.decode_tokens, rows)
        for first, end, start, gather in self.chunks:
            if gather is None:
                out[first:end] = causal_attention(q[:, first:end], k[:, first:end],
                                                  v[:, first:end], scale)[0]
            else:
                keys = gather.read(self.kv, k_plane).view(1, -1, n_kv, head_dim)
                values = gather.read(self.kv, v_plane).view(1, -1, n_kv, head_dim)
                out[first:end] = chunk_attention(q[:, first:end], keys, values, start, scale)[0]
        return out[None]

    def _decode(self, q: torch.Tensor, k_plane: int, v_plane: int, n_kv: int, head_dim: int,
                scale: float) -> torch.Tensor:
        """q [Bd, nh, hd] of the decode rows -> [Bd, nh, hd]."""
        B, max_len = self.decode.row.shape
        if self.decode_kernel:
            slots = self.decode.slot
            return paged_decode_attention(q, self.kv.view(-1, self.kv.shape[-1]),
                                          slots[k_plane].view(B, max_len),
                                          slots[v_plane].view(B, max_len), self.decode_lens,
                                          scale)
        keys = self.decode.read(self.kv, k_plane).view(B, max_len, n_kv, head_dim)
        values = self.decode.read(self.kv, v_plane).view(B, max_len, n_kv, head_dim)
        return decode_attention(q, keys, values, self.mask, scale)


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


def chunk_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
                    scale: float) -> torch.Tensor:
    """A prompt chunk against its sequence's context. q [1, Q, nh, hd] at positions
    start .. start + Q - 1; keys/values [1, start + Q, nkv, hd] (positions 0 ..) -> [1, Q, nh, hd].
    Query i reads keys 0 .. start + i: causal, aligned to the end of the keys (SDPA's
    `is_causal` aligns to their start, hence the explicit mask)."""
    Q, L = q.shape[1], keys.shape[1]
    n_rep = q.shape[2] // keys.shape[2]
    if n_rep > 1:
        keys = keys.repeat_interleave(n_rep, dim=2)
        values = values.repeat_interleave(n_rep, dim=2)
    mask = (torch.arange(L, device=q.device)[None, :]
            <= start + torch.arange(Q, device=q.device)[:, None])              # [Q, L]
    y = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2),
                                       values.transpose(1, 2), attn_mask=mask, scale=scale)
    return y.transpose(1, 2)
