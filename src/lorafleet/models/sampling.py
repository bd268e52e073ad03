"""Choosing the next token from logits: plain, batch-friendly functions.

Every function takes logits [B, V] and per-row parameters (a Python number for all rows, or a
tensor [B]), so single-model generation and the serving engine's mixed batches (each request
with its own temperature / top-k / top-p / seed) share the same math. The order and the
tie-breaking follow transformers' logits warpers: temperature, then top-k, then top-p.
"""
from __future__ import annotations

import torch


def per_row(value, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A scalar or a [B] sequence -> a [B] tensor."""
    tensor = torch.as_tensor(value, dtype=dtype, device=device)
    return tensor.expand(rows) if tensor.dim() == 0 else tensor


def apply_temperature(logits: torch.Tensor, temperature) -> torch.Tensor:
    """Divide each row by its temperature; rows with temperature <= 0 (greedy) are unchanged."""
    t = per_row(temperature, logits.shape[0], logits.dtype, logits.device)
    return logits / torch.where(t > 0, t, torch.ones_like(t))[:, None]


def top_k_filter(logits: torch.Tensor, top_k) -> torch.Tensor:
    """Keep each row's `top_k` largest logits (ties with the k-th kept), -inf elsewhere.
    top_k <= 0 or >= V means no limit."""
    V = logits.shape[-1]
    k = per_row(top_k, logits.shape[0], torch.long, logits.device)
    k = torch.where((k <= 0) | (k > V), torch.full_like(k, V), k)
    k_max = int(k.max())
    top = logits.topk(k_max, dim=-1).values  # [B, k_max], descending
    threshold = top.gather(-1, (k - 1)[:, None])
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of tokens whose
    probability reaches top_p (at least one token); top_p >= 1 keeps everything."""
    p = per_row(top_p, logits.shape[0], torch.float32, logits.device)
    sorted_logits, order = logits.sort(dim=-1)  # ascending, as transformers does
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)[:, None]
    remove[:, -1] = False  # always keep the most likely token
    remove &= (p < 1)[:, None]
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def probabilities(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0) -> torch.Tensor:
    """The distribution sampling draws from: [B, V] float32."""
    logits = apply_temperature(logits.float(), temperature)
    return top_p_filter(top_k_filter(logits, top_k), top_p).softmax(dim=-1)


def sample(logits: torch.Tensor, temperature=0.0, top_k=0, top_p=1.0,
           generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
    """Next token per row: [B, V] -> [B] (long). Rows with temperature <= 0 are greedy.
    `generators[b]` (optional) makes row b reproducible under its own seed."""
    B = logits.shape[0]
    greedy_tokens = logits.argmax(dim=-1)
    t = per_row(temperature, B, torch.float32, logits.device)
    sampled_rows = (t > 0).nonzero().flatten().tolist()
    if not sampled_rows:
        return greedy_tokens
    probs = probabilities(logits, t, top_k, top_p)
    tokens = greedy_tokens.clone()
    shared = [b for b in sampled_rows if not generators or generators[b] is None]
    if shared:
        tokens[shared] = torch.multinomial(probs[shared], 1).flatten()
    for b in sampled_rows:
        if generators and generators[b] is not None:
            tokens[b] = torch.multinomial(probs[b], 1, generator=generators[b])[0]
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under the unmodified distribution: logits [B, V], tokens [B] -> [B]."""
    return logits.float().log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


def token_and_top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`token_logprobs` plus each row's k most likely tokens, from one log-softmax of the
    unmodified distribution (temperature, top-k and top-p change what is drawn, not what is
    reported). logits [B, V], tokens [B] -> (chosen [B], top values [B, k] descending, top ids
    [B, k])."""
    logprobs = logits.float().log_softmax(dim=-1)
    top = logprobs.topk(k, dim=-1)
    return logprobs.gather(-1, tokens[:, None]).squeeze(-1), top.values, top.indices
