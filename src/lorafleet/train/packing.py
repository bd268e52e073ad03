"""Packed rows that do not attend across examples (TRL's padding-free packing).

A packed row holds several whole examples back to back (data.pack records their `lengths`).
Each token may attend only to earlier tokens of its own example: a block-diagonal causal mask,
and positions restart at 0 per example, so RoPE sees each example exactly as if it ran alone.
Our models take both through `ForwardBatch` (positions + an attention backend); the result is
the same logits as running each example by itself (tests/train/test_packing.py holds them equal).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafleet.errors import ConfigError
from lorafleet.models.batch import ForwardBatch


class BlockDiagonalAttention:
    """Causal attention within segments: mask [B, 1, T, T], True where a query may read a key."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> torch.Tensor:
        """q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D]."""
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=self.mask, scale=scale,
                                           enable_gqa=k.shape[2] != q.shape[2])
        return y.transpose(1, 2)


def segments(lengths_per_row: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the examples' lengths -> segment ids and positions [B, T]. The padding after the
    last example is a segment of its own (it attends only to itself: no row is all-masked)."""
    seg = torch.empty(len(lengths_per_row), width, dtype=torch.long)
    pos = torch.empty(len(lengths_per_row), width, dtype=torch.long)
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for i, n in enumerate(lengths + [width - sum(lengths)]):
            seg[row, start:start + n] = i
            pos[row, start:start + n] = torch.arange(n)
            start += n
    return seg, pos


def block_causal_mask(seg: torch.Tensor) -> torch.Tensor:
    """segment ids [B, T] -> bool mask [B, 1, T, T]: same segment and key not after query."""
    T = seg.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def packed_batch(lengths_per_row: list[list[int]], width: int, device) -> ForwardBatch:
    seg, pos = segments(lengths_per_row, width)
    seg, pos = seg.to(device), pos.to(device)
    return ForwardBatch(positions=pos, attention=BlockDiagonalAttention(block_causal_mask(seg)))


def takes_forward_batch(model: torch.nn.Module) -> bool:
    """Our models' forward(input_ids, batch); transformers' and the virtual-token wrappers'
    forward(input_ids) cannot take per-example positions and masks."""
    from lorafleet.models.gpt2 import GPT2
    from lorafleet.models.llama import Llama
    return isinstance(model, (Llama, GPT2))


def check_packable(model: torch.nn.Module) -> None:
    if not takes_forward_batch(model):
        raise ConfigError(f"--pack: {type(model).__name__} cannot take a block-diagonal "
                          "attention mask (lorafleet's own models can); without one packed "
                          "examples would attend to each other. Train without --pack, or with "
                          "--method lora / qlora / full / adapter / bitfit on a lorafleet model")
