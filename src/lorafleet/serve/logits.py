"""What the engine does with a step's logits: the per-request processing vLLM's sampling
parameters ask for (penalties, logit_bias, min_tokens), sampling each row's token (greedy,
temperature / top-k / top-p / min-p, the JSON constraint), the sampled tokens' logprobs, and
the scoring of prompt tokens (prompt logprobs, for `echo` with logprobs).

Both work on the rows that ask only: a batch where no request uses them pays nothing, and
the penalties touch only the tokens each row has seen (models/sampling.py).
"""
from __future__ import annotations

from typing import Callable

import torch

from lorafleet.models.sampling import (apply_frequency_presence, apply_repetition_penalty,
                                       padded_ids, sample, token_and_top_logprobs)

from .json_grammar import JsonVocab, constrain_json
from .output import TokenLogprob
from .sequence import Sequence


def process_logits(seqs: list[Sequence], logits: torch.Tensor, eos_ids) -> torch.Tensor:
    """Penalties, logit_bias and min_tokens of each row's request, applied to a copy of the
    logits [B, V] (in this order, before temperature, as vLLM); `logits` itself when no row
    asks. The engine reports logprobs from the logits before this: the model's own
    distribution. eos_ids: the model's, unless a request names its own."""
    penalized = [i for i, s in enumerate(seqs) if s.params.has_penalties]
    biased = [i for i, s in enumerate(seqs) if s.params.logit_bias]
    held = [i for i, s in enumerate(seqs) if len(s.output_ids) < s.params.min_tokens]
    if not (penalized or biased or held):
        return logits
    logits, vocab, device = logits.clone(), logits.shape[-1], logits.device
    if penalized:
        index = torch.tensor(penalized, device=device)
        rows = logits.index_select(0, index)
        ps = [seqs[i].params for i in penalized]
        if any(p.repetition_penalty != 1 for p in ps):
            ids, valid = padded_ids([seqs[i].prompt_ids + seqs[i].output_ids
                                     for i in penalized], device)
            rows = apply_repetition_penalty(rows, ids, valid, [p.repetition_penalty for p in ps])
        if any(p.frequency_penalty or p.presence_penalty for p in ps):
            ids, valid = padded_ids([seqs[i].output_ids for i in penalized], device)
            rows = apply_frequency_presence(rows, ids, valid, [p.frequency_penalty for p in ps],
                                            [p.presence_penalty for p in ps])
        logits.index_copy_(0, index, rows)
    if biased:
        pairs = [(i, t, b) for i in biased for t, b in seqs[i].params.logit_bias.items()
                 if 0 <= t < vocab]
        if pairs:
            r, t, b = zip(*pairs)
            logits.index_put_((torch.tensor(r, device=device), torch.tensor(t, device=device)),
                              torch.tensor(b, dtype=logits.dtype, device=device),
                              accumulate=True)
    for i in held:      # EOS and stop tokens may not end it yet (vLLM's min_tokens)
        p = seqs[i].params
        banned = set(p.stop_token_ids) | set(eos_ids if p.eos_token_ids is None
                                             else p.eos_token_ids)
        banned = [t for t in banned if 0 <= t < vocab]
        if banned:
            logits[i, banned] = float("-inf")
    return logits


def score_prompts(rows: list[tuple[Sequence, int, int]], logits: torch.Tensor) -> None:
    """Prompt logprobs: rows (sequence, first position, count), from the runner, own
    consecutive slices of logits [sum(count), V]; position j's logits give prompt token j + 1
    its logprob (and, with params.prompt_logprobs = N, the N most likely tokens), appended to
    the sequence's `prompt_logprobs` (whose first entry, the first token's, is None). A long
    prompt is scored chunk by chunk as its prefill runs over several steps."""
    offset = 0
    for seq, first, count in rows:
        chunk = logits[offset:offset + count]
        offset += count
        targets = torch.tensor(seq.prompt_ids[first + 1:first + 1 + count], device=chunk.device)
        n = seq.params.prompt_logprobs
        chosen, top_values, top_ids = token_and_top_logprobs(chunk, targets, max(n, 1))
        chosen = chosen.tolist()
        if n:
            top_values, top_ids = top_values[:, :n].tolist(), top_ids[:, :n].tolist()
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)     # the first token: nothing predicts it
        for j, token in enumerate(targets.tolist()):
            if n:
                seq.prompt_logprobs.append({**dict(zip(top_ids[j], top_values[j])),
                                            token: chosen[j]})
            else:
                seq.prompt_logprobs.append(chosen[j])


def sample_rows(seqs: list[Sequence], logits: torch.Tensor, eos_ids,
                json_vocab: Callable[[], JsonVocab]) -> torch.Tensor:
    """One token per row of logits [B, V] (tokens [B]) with each row's request's parameters:
    processed as `process_logits`, then greedy when every row is, else sampled per row; rows
    with response_format json_object constrained to valid JSON (`json_vocab`: the token texts,
    asked for only then)."""
    logits = process_logits(seqs, logits, eos_ids)
    if all(s.params.temperature == 0 for s in seqs):
        tokens = logits.argmax(dim=-1)
    else:
        tokens = sample(logits, [s.params.temperature for s in seqs],
                        [s.params.top_k for s in seqs], [s.params.top_p for s in seqs],
                        [s.generator for s in seqs], [s.params.min_p for s in seqs])
    if any(s.params.json_object for s in seqs):
        tokens = constrain_json(seqs, logits, tokens, json_vocab(), eos_ids)
    return tokens


def sampled_logprobs(seqs: list[Sequence], logits: torch.Tensor,
                     tokens: torch.Tensor) -> list[TokenLogprob | None] | None:
    """Per row (logits [B, V], tokens [B]): None when its request did not ask, else its
    TokenLogprob. None when no row asks: the default path computes nothing."""
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs]
    if not rows:
        return None
    k = max(seqs[i].params.top_logprobs for i in rows)
    if len(rows) < len(seqs):
        index = torch.tensor(rows, device=logits.device)
        logits, tokens = logits.index_select(0, index), tokens.index_select(0, index)
    chosen, top_values, top_ids = token_and_top_logprobs(logits, tokens, k)
    chosen, top_values, top_ids = chosen.tolist(), top_values.tolist(), top_ids.tolist()
    result: list[TokenLogprob | None] = [None] * len(seqs)
    for j, (i, token) in enumerate(zip(rows, tokens.tolist())):
        n = seqs[i].params.top_logprobs
        if n:
            result[i] = {**dict(zip(top_ids[j][:n], top_values[j][:n])), token: chosen[j]}
        else:
            result[i] = chosen[j]
    return result
