"""Building blocks shared by the model families: RMSNorm, RoPE, activations, causal attention.

The math is written out as plain functions so each can be read against its paper and tested on
its own; the modules in llama.py / gpt2.py only hold parameters and call these.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.errors import ConfigError

from .batch import AttentionBackend


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's "gelu_new": the tanh approximation of GELU."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "relu": F.relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ConfigError(f"hidden_act {name!r} is not supported; supported: "
                          f"{', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32 then cast back (as Llama does) so
    bf16 models keep the reduction precise."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


# ---- RoPE (Su et al. 2021), in the "rotate half" layout Hugging Face checkpoints use ----------

def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32, with optional "linear" or "llama3" scaling.

    llama3 (Llama 3.1 release): wavelengths shorter than original_len / high_freq_factor are
    kept, longer than original_len / low_freq_factor are divided by `factor`, and the band in
    between is interpolated smoothly.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                             device="cpu").float() / head_dim))
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen, high_freq_wavelen = original_len / low, original_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """positions [B, T] -> cos, sin [B, T, 1, head_dim] (a head axis to broadcast over)."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, D]: rotate each (x[i], x[i + D/2]) pair by its position's angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Rotary(nn.Module):
    """Holds the inverse frequencies. They are recomputed per device instead of being a buffer,
    so building on the meta device and casting the model to bf16 never degrade them."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        device = positions.device
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inv_freq(self.head_dim, self.theta,
                                                   self.scaling).to(device)
        return rope_cos_sin(positions, self._inv_freq[device], dtype)


# ---- attention ----------------------------------------------------------------------------

def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Causal attention over the given tokens only. q [B, T, H, D], k/v [B, T, Hkv, D] ->
    [B, T, H, D]. Grouped-query attention: query head h reads key/value head h // (H / Hkv)."""
    n_rep = q.shape[2] // k.shape[2]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=2)
        v = v.repeat_interleave(n_rep, dim=2)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=q.shape[1] > 1, scale=scale)
    return y.transpose(1, 2)


def attend(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           backend: AttentionBackend | None) -> torch.Tensor:
    """The one place a layer's attention is dispatched: plain causal (training) or a backend
    (KV cache, paged KV cache) that knows which earlier tokens each token may read."""
    if backend is None:
        return causal_attention(q, k, v, scale)
    return backend.attend(layer_idx, q, k, v, scale)
