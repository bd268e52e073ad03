"""The one explicit argument that carries batch metadata into a model's forward.

Training, single-model generation and the serving engine all call the same model code; they
differ only in the `ForwardBatch` they pass (STYLE.md rule 13: no module-level globals).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


class AttentionBackend(Protocol):
    """Where keys/values are kept and how attention reads them.

    `attend` receives the current tokens' q `[B, T, n_heads, head_dim]` and k, v
    `[B, T, n_kv_heads, head_dim]` (RoPE already applied) and returns `[B, T, n_heads, head_dim]`.
    A contiguous KV cache, a paged KV cache (serving) and plain causal attention (training) are
    three implementations.
    """

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> torch.Tensor: ...


@dataclass
class ForwardBatch:
    """positions: [B, T] absolute positions of the input tokens.
    attention: None means causal attention over the given tokens only (training).
    lora: passed as the second argument to every adapted projection (LoRA layers and the serving
    engine's batched LoRA layers); None means each projection is called as `module(x)`.
    """

    positions: torch.Tensor
    attention: AttentionBackend | None = None
    lora: Any = None


def project(module: torch.nn.Module, x: torch.Tensor, lora: Any) -> torch.Tensor:
    """Call a projection, handing it the batch's LoRA metadata when there is some."""
    return module(x) if lora is None else module(x, lora)
