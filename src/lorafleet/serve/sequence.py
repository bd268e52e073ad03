"""One request's state as it moves through the engine: waiting -> running -> finished (and back
to waiting when preempted). Plain Python, shared by the scheduler and the engine.

Progress is one number, `num_computed_tokens`: how many of `token_ids` have their K/V in the
sequence's pages. A step runs some of the others (`num_pending_tokens`: the prompt, a chunk of
it, or the one token sampled last step) and samples only when it reaches the end. Admission
sets `prefill_end` (the length then): below it the sequence is prefilling, past it
decoding."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    adapter: str | None
    params: Any                      # SamplingParams (the scheduler only reads max_tokens)
    arrival_time: float
    max_tokens: int                  # params.max_tokens clamped to the model's context
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float | dict[int, float]] = field(default_factory=list)  # dict: top-N
    # With params.prompt_logprobs: one entry per prompt token scored so far, None for the
    # first (nothing before it to predict it), as `logprobs`.
    prompt_logprobs: list = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    status: SeqStatus = SeqStatus.WAITING
    adapter_pinned: bool = False     # holds a reference on its adapter in the adapter cache
    first_token_time: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    num_preemptions: int = 0
    tenant: str | None = None        # who sent it (API key id): admission round-robins over these
    # Aging (scheduler.py): admissions counted when it (re)joined the queue, and how many
    # requests were ahead of it then.
    admissions_at_arrival: int = 0
    queue_ahead_at_arrival: int = 0
    num_computed_tokens: int = 0     # tokens whose K/V are in the pages (0 again when preempted)
    prefill_end: int = 0             # its length when last admitted: what its prefill computes
    # Streaming state owned by the engine: tokens handed out so far (serve/output.py keeps the
    # text), generator for sampling.
    sent_token_count: int = 0
    generator: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_pending_tokens(self) -> int:
        """Tokens not yet run through the model: the whole sequence when (re)admitted, the rest
        of a chunked prompt, or 1 when decoding (the token sampled on the previous step)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """Admitted, and its prompt (plus output so far, after a preemption) not all computed:
        it runs prompt chunks, not decode rows (even when one token of it is left)."""
        return self.num_computed_tokens < self.prefill_end

    def token_slice(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building the whole list (a decode row reads one)."""
        num_prompt = len(self.prompt_ids)
        if start >= num_prompt:
            return self.output_ids[start - num_prompt:end - num_prompt]
        return self.prompt_ids[start:end] + self.output_ids[:max(0, end - num_prompt)]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
