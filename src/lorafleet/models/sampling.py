"""Choosing the next token from logits: plain, batch-friendly functions.

Every function takes logits [B, V] and per-row parameters (a Python number for all rows, or a
tensor [B]), so single-model generation and the serving engine's mixed batches (each request
with its own temperature / top-k / top-p / seed) share the same math. The order and the
tie-breaking follow transformers' logits warpers: temperature, then top-k, then top-p.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from lorafleet.errors import SamplingError

# Most alternatives a request may ask per token: OpenAI's ceiling for chat `top_logprobs`.
MAX_TOP_LOGPROBS = 20
# vLLM's floor for a positive temperature: below it logits / T overflows to inf (a request with
# T = 1e-40 used to fail the whole batch); T in (0, floor) is raised to the floor.
MIN_TEMPERATURE = 1e-2
# top_k above any vocabulary means "no limit": kept as 0 so a huge k (2**63) never reaches an
# int64 tensor, where it would overflow.
MAX_TOP_K = 2**31 - 1
# torch.Generator.manual_seed accepts [-2**63, 2**64 - 1].
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def _is_int(value) -> bool:
    """An integer (numpy's too), never a bool: True is not a token count."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How one completion is drawn: the one sampling-parameter type of single-model generation
    (`models.generate`) and of the serving engine (re-exported as `lorafleet.serve.SamplingParams`).

    temperature 0 = greedy; top_k 0 (or -1, vLLM's spelling) and top_p 1 = no filtering; stop
    strings end the completion (they need a tokenizer) and are not part of the returned text; a
    single string is one stop string. logprobs: report each token's logprob; top_logprobs N:
    also the N most likely tokens per position. eos_token_ids None: the tokenizer's, else the
    model config's. Validated on construction (SamplingError names the field); values that are
    valid but numerically unsafe are clamped (see MIN_TEMPERATURE, MAX_TOP_K)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    eos_token_ids: list[int] | None = None
    # Penalties (OpenAI's and vLLM's meanings), applied to the raw logits before temperature:
    # presence subtracts `presence_penalty` from every token already in the output, frequency
    # `frequency_penalty` times its count there; repetition (CTRL, transformers'
    # RepetitionPenaltyLogitsProcessor) divides positive / multiplies negative logits of every
    # token in the prompt or the output. min_p (after top-k and top-p, as transformers):
    # drop tokens below min_p times the most likely token's probability.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: dict[int, float] | None = None   # token id -> added to its logit
    stop_token_ids: list[int] = field(default_factory=list)   # end like EOS, not returned
    min_tokens: int = 0              # EOS and stop_token_ids masked until this many tokens
    # Logprobs of the prompt's tokens (the first has none): None = off, 0 = each token's own,
    # N = also the N most likely tokens per position.
    prompt_logprobs: int | None = None
    # Constrain the output to one JSON value (json_grammar.py); the response_format json_object.
    json_object: bool = False

    def __post_init__(self):
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise SamplingError(f"temperature must be a finite number >= 0, got "
                                f"{self.temperature!r}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = MIN_TEMPERATURE
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise SamplingError(f"top_k must be an integer >= 0 (or -1: no limit), got "
                                f"{self.top_k!r}")
        if self.top_k == -1 or self.top_k > MAX_TOP_K:
            self.top_k = 0
        if self.seed is not None and (not _is_int(self.seed)
                                      or not SEED_MIN <= self.seed <= SEED_MAX):
            raise SamplingError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], got "
                                f"{self.seed!r}")
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or \
                not all(isinstance(s, str) for s in self.stop):
            raise SamplingError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = list(self.stop)
        if any(s == "" for s in self.stop):
            raise SamplingError("stop strings must be non-empty (an empty one would stop at once)")
        for flag in ("logprobs", "ignore_eos"):
            if not isinstance(getattr(self, flag), bool):
                raise SamplingError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise SamplingError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got "
                                f"{self.top_logprobs!r}")
        if self.top_logprobs and not self.logprobs:
            raise SamplingError("top_logprobs needs logprobs=True")
        if self.eos_token_ids is not None and not all(_is_int(t) for t in self.eos_token_ids):
            raise SamplingError(f"eos_token_ids must be a list of token ids, got "
                                f"{self.eos_token_ids!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise SamplingError(f"{name} must be in [-2, 2], got {value!r}")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty <= 100:
            raise SamplingError(f"repetition_penalty must be in (0, 100], got "
                                f"{self.repetition_penalty!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise SamplingError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.logit_bias:
            if not isinstance(self.logit_bias, dict) or not all(
                    _is_int(k) and _is_number(v) and -100 <= v <= 100
                    for k, v in self.logit_bias.items()):
                raise SamplingError("logit_bias must map token ids to numbers in [-100, 100]")
        self.logit_bias = dict(self.logit_bias) if self.logit_bias else None
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not isinstance(self.stop_token_ids, (list, tuple)) or \
                not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise SamplingError(f"stop_token_ids must be a list of token ids, got "
                                f"{self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise SamplingError(f"min_tokens must be an integer in [0, max_tokens], got "
                                f"{self.min_tokens!r}")
        if self.prompt_logprobs is not None and (
                not _is_int(self.prompt_logprobs)
                or not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS):
            raise SamplingError(f"prompt_logprobs must be None or in [0, {MAX_TOP_LOGPROBS}], "
                                f"got {self.prompt_logprobs!r}")
        if not isinstance(self.json_object, bool):
            raise SamplingError(f"json_object must be true or false, got {self.json_object!r}")

    @property
    def has_penalties(self) -> bool:
        """Whether the logits need the penalty pass (rows that do not skip it)."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)


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


def min_p_filter(logits: torch.Tensor, min_p) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the row's largest (Nguyen et al.
    2024; transformers' MinPLogitsWarper); min_p 0 keeps everything."""
    m = per_row(min_p, logits.shape[0], torch.float32, logits.device)
    probs = logits.float().softmax(dim=-1)
    threshold = m[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def padded_ids(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids as one [R, W] long tensor and a [R, W] float mask of the real entries.
    Padding repeats the row's first id (0 for an empty row): a scatter of a value computed per
    token then writes the same value again, never a different one (scatter with duplicate
    indices keeps an arbitrary one of the values written)."""
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.nn.utils.rnn.pad_sequence(
        [torch.as_tensor(r, dtype=torch.long) if len(r) else torch.zeros(1, dtype=torch.long)
         for r in rows], batch_first=True)
    valid = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
    ids = torch.where(valid, ids, ids[:, :1])
    return ids.to(device), valid.to(device=device, dtype=torch.float32)


def apply_repetition_penalty(logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor,
                             penalty) -> torch.Tensor:
    """CTRL's penalty (transformers' RepetitionPenaltyLogitsProcessor): each row's logits of
    the tokens it has seen (`ids`, `valid` from padded_ids) divided by the penalty when
    positive, multiplied when negative; once per token, however often it occurs. In place, and
    only those tokens: O(rows x tokens seen), not O(rows x vocabulary)."""
    p = per_row(penalty, logits.shape[0], logits.dtype, logits.device)[:, None]
    seen = logits.gather(1, ids)
    penalized = torch.where(seen < 0, seen * p, seen / p)
    # padding repeats a real id of its row, so it must write that id's penalized value too;
    # only an empty row (all padding) keeps its logits
    return logits.scatter_(1, ids, torch.where(valid[:, :1] > 0, penalized, seen))


def apply_frequency_presence(logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor,
                             frequency, presence) -> torch.Tensor:
    """OpenAI's penalties: logit -= frequency * count + presence * (count > 0), where count is
    how often the token occurs in the row's output so far (`ids`, `valid` from padded_ids).
    In place."""
    f = per_row(frequency, logits.shape[0], logits.dtype, logits.device)[:, None]
    p = per_row(presence, logits.shape[0], logits.dtype, logits.device)[:, None]
    seen = logits.gather(1, ids)
    # presence: written (not added) at every occurrence, so once per token
    logits.scatter_(1, ids, seen - p * valid[:, :1])     # padding repeats a real id: same value
    # frequency: added at every occurrence, so count times
    return logits.scatter_add_(1, ids, -f * valid)


def probabilities(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0,
                  min_p=0.0) -> torch.Tensor:
    """The distribution sampling draws from: [B, V] float32. Each row is shifted by its maximum
    first (softmax is unchanged) so a small temperature cannot overflow finite logits to inf."""
    logits = logits.float()
    logits = apply_temperature(logits - logits.amax(dim=-1, keepdim=True), temperature)
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    if not (isinstance(min_p, (int, float)) and min_p == 0):
        logits = min_p_filter(logits, min_p)
    return logits.softmax(dim=-1)


def sample(logits: torch.Tensor, temperature=0.0, top_k=0, top_p=1.0,
           generators: list[torch.Generator | None] | None = None, min_p=0.0) -> torch.Tensor:
    """Next token per row: [B, V] -> [B] (long). Rows with temperature <= 0 are greedy.
    `generators[b]` (optional) makes row b reproducible under its own seed."""
    B = logits.shape[0]
    greedy_tokens = logits.argmax(dim=-1)
    t = per_row(temperature, B, torch.float32, logits.device)
    sampled_rows = (t > 0).nonzero().flatten().tolist()
    if not sampled_rows:
        return greedy_tokens
    if not isinstance(min_p, (int, float)) and not any(min_p):
        min_p = 0.0        # a list of zeros: skip the extra softmax
    probs = probabilities(logits, t, top_k, top_p, min_p)
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
