"""Single-model generation with a contiguous KV cache (gpt-fast's generate.py, without the
compile): `prefill` runs the prompt once, `decode_one_token` extends by one token, `generate`
loops until max_new_tokens, an EOS token or a stop string.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from lorafleet.errors import ConfigError

from .batch import ForwardBatch
from .kv_cache import KVCache
from .sampling import SamplingParams, sample


@dataclass
class Generation:
    token_ids: list[int]  # the new tokens only (a stop string's tokens included)
    text: str | None  # decoded new tokens (None without a tokenizer), cut before a stop string
    finish_reason: str  # "stop" (EOS or stop string) or "length"


def prefill(model: nn.Module, input_ids: torch.Tensor, cache: KVCache, lora: Any = None):
    """input_ids [B, T] from position 0 -> last-token logits [B, V]."""
    B, T = input_ids.shape
    positions = torch.arange(T, device=input_ids.device).expand(B, T)
    cache.begin(positions)
    batch = ForwardBatch(positions=positions, attention=cache, lora=lora)
    last = torch.tensor([T - 1], device=input_ids.device)
    return model(input_ids, batch, logits_indices=last)[:, -1]


def decode_one_token(model: nn.Module, token: torch.Tensor, position: int, cache: KVCache,
                     lora: Any = None):
    """token [B] at `position` -> next-token logits [B, V]."""
    B = token.shape[0]
    positions = torch.full((B, 1), position, dtype=torch.long, device=token.device)
    cache.begin(positions)
    batch = ForwardBatch(positions=positions, attention=cache, lora=lora)
    return model(token[:, None], batch)[:, -1]


def _eos_ids(sampling: SamplingParams, model: nn.Module, tokenizer) -> set[int]:
    if sampling.ignore_eos:
        return set()
    if sampling.eos_token_ids is not None:
        return set(sampling.eos_token_ids)
    if tokenizer is not None and getattr(tokenizer, "eos_token_ids", None):
        return set(tokenizer.eos_token_ids)
    eos = model.config.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


@torch.inference_mode()
def generate(model: nn.Module, input_ids: Sequence[int] | torch.Tensor,
             max_new_tokens: int | None = None, sampling: SamplingParams | None = None,
             lora: Any = None, tokenizer=None) -> Generation:
    """Complete one prompt (`input_ids` [T] or [1, T]). `lora` is handed to every projection
    (e.g. `["my_adapter"]` for LoRA layers). `max_new_tokens` overrides `sampling.max_tokens`
    (and may be 0)."""
    sampling = sampling or SamplingParams()
    limit = sampling.max_tokens if max_new_tokens is None else max_new_tokens
    if limit < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {limit}")
    if sampling.stop and tokenizer is None:
        raise ConfigError("stop strings need a tokenizer")
    device = next(model.parameters()).device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).reshape(1, -1)
    T = ids.shape[1]
    if T == 0:
        raise ConfigError("input_ids is empty: a prompt needs at least one token")
    max_positions = model.config.max_position_embeddings
    if model.config.family == "gpt2" and T + limit > max_positions:
        raise ConfigError(f"prompt ({T}) + max_new_tokens ({limit}) exceed the model's "
                          f"{max_positions} positions")
    eos = _eos_ids(sampling, model, tokenizer)
    generators = None
    if sampling.seed is not None:
        generators = [torch.Generator(device=device).manual_seed(sampling.seed)]
    cache = KVCache.for_model(model, 1, T + limit)
    new_tokens: list[int] = []
    finish_reason = "length"
    stop_text = None  # the text cut before a stop string, once one appears
    if limit > 0:
        logits = prefill(model, ids, cache, lora)
    for step in range(limit):
        token = sample(logits, sampling.temperature, sampling.top_k, sampling.top_p, generators)
        new_tokens.append(int(token[0]))
        if new_tokens[-1] in eos:
            new_tokens.pop()  # EOS ends the completion and is not part of it
            finish_reason = "stop"
            break
        if sampling.stop:
            text = tokenizer.decode(new_tokens)
            cut = min((i for i in (text.find(s) for s in sampling.stop) if i >= 0), default=-1)
            if cut >= 0:
                stop_text, finish_reason = text[:cut], "stop"
                break
        if step + 1 < limit:
            logits = decode_one_token(model, token, T + step, cache, lora)
    text = stop_text
    if text is None and tokenizer is not None:
        text = tokenizer.decode(new_tokens)
    return Generation(token_ids=new_tokens, text=text, finish_reason=finish_reason)
