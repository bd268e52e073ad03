"""The one explicit argument that carries batch metadata into a model's forward.

Training, single-model generation and the serving engine all call the same model code; they
differ only in the `ForwardBatch` they pass (STYLE.md rule 13: no module-level globals).
"""
from __future__ import annotations

import functools
import inspect
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


@functools.cache
def takes_lora(module_type: type) -> bool:
    """Whether `module_type.forward` accepts a second argument (the LoRA metadata). Plain
    projections (nn.Linear, Conv1D, a 4-bit linear) take only x."""
    params = list(inspect.signature(module_type.forward).parameters.values())[1:]  # skip self
    positional = [p for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in positional)


def project(module: torch.nn.Module, x: torch.Tensor, lora: Any) -> torch.Tensor:
    """Call a projection, handing it the batch's LoRA metadata when there is some and the
    module takes it (adapters may target only some projections)."""
    if lora is None or not takes_lora(type(module)):
        return module(x)
    return module(x, lora)
