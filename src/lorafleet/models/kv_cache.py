"""A contiguous KV cache (gpt-fast's `KVCache`): one preallocated [B, Hkv, max_len, D] buffer
per layer for keys and one for values. It is an `AttentionBackend`: each layer writes the new
tokens' k, v at their positions and attends over everything cached so far.

The serving engine uses a paged cache instead (serve/); this one is for single-model
generation, where every row of the batch advances in step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.errors import ConfigError


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: str | torch.device = "cpu"):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.positions: torch.Tensor | None = None
        self._length = 0  # keys [0, _length) are read by this step
        self._mask: torch.Tensor | None = None
        self._causal = False
        self._span: tuple[int, int] | None = None  # set when all rows write the same slots

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_len: int) -> "KVCache":
        config = model.config
        # the first floating-point parameter: a 4-bit model also holds uint8 storage
        param = next(p for p in model.parameters() if p.is_floating_point())
        return cls(config.num_hidden_layers, batch_size, max_len, config.num_key_value_heads,
                   config.head_dim, param.dtype, param.device)

    def begin(self, positions: torch.Tensor) -> None:
        """Set the positions [B, T] of the tokens the next forward writes; called once per
        forward, before it (the layers then call `attend`)."""
        B, T = positions.shape
        length = int(positions.max()) + 1
        if length > self.max_len:
            raise ConfigError(f"sequence of {length} tokens exceeds the KV cache's max_len "
                              f"{self.max_len}")
        self.positions, self._length = positions, length
        same_rows = bool((positions == positions[:1]).all())
        first = positions[0]
        contiguous = bool((first == torch.arange(length - T, length,
                                                 device=positions.device)).all())
        # Fast paths SDPA handles without a mask: a prefill from position 0 (causal), or every
        # row decoding one token at the same position (it reads all cached keys).
        self._causal = same_rows and contiguous and length == T and T > 1
        self._span = (length - T, length) if same_rows and contiguous else None
        if same_rows and contiguous and T == 1:
            self._mask = None
        elif self._causal:
            self._mask = None
        else:
            keys = torch.arange(length, device=positions.device)
            self._mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [B,1,T,L]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> torch.Tensor:
        """q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D]."""
        k_cache, v_cache = self.k[layer_idx], self.v[layer_idx]  # [B, Hkv, max_len, D]
        if self._span is not None:  # the common case: a slice copy, no index tensors
            start, end = self._span
            k_cache[:, :, start:end] = k.transpose(1, 2)
            v_cache[:, :, start:end] = v.transpose(1, 2)
        else:
            rows = torch.arange(q.shape[0], device=q.device)[:, None]
            k_cache[rows, :, self.positions] = k  # advanced indices first: [B, T, Hkv, D]
            v_cache[rows, :, self.positions] = v
        keys, values = k_cache[:, :, :self._length], v_cache[:, :, :self._length]
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=self._mask,
                                           is_causal=self._causal, scale=scale,
                                           enable_gqa=keys.shape[1] != q.shape[2])
        return y.transpose(1, 2)
