"""One request's state as it moves through the engine: waiting -> running -> finished (and back
to waiting when preempted). Plain Python, shared by the scheduler and the engine."""
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
    logprobs: list[float] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    adapter_pinned: bool = False     # holds a reference on its adapter in the adapter cache
    first_token_time: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    num_preemptions: int = 0
    # Streaming state owned by the engine: text handed out so far, generator for sampling.
    text: str = ""
    sent_text_len: int = 0
    sent_token_count: int = 0
    generator: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
