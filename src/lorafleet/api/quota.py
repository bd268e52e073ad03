"""Per-key fair share: at most `max_concurrent` sequences in flight and `tokens_per_minute`
tokens per key, both set in the keys file (auth.py). Beyond either the key gets 429 with a
Retry-After; other keys are unaffected, so one tenant's flood cannot fill the queue for the rest.

Tokens are a token bucket (capacity = the per-minute budget, refilled continuously): admission
reserves the most a request can use, n * (prompt + max_tokens), and the release gives back what
it did not use, so a key is never charged for tokens it was not served. Plain Python, no torch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

SECONDS_PER_MINUTE = 60.0


@dataclass
class TokenBucket:
    per_minute: int
    level: float = -1.0          # tokens available now (starts full)
    updated: float = 0.0

    def available(self, now: float) -> float:
        """The tokens available at `now` (read only: the refill is computed, not applied)."""
        if self.level < 0:          # never used: full
            return float(self.per_minute)
        rate = self.per_minute / SECONDS_PER_MINUTE
        return min(float(self.per_minute), self.level + (now - self.updated) * rate)

    def refill(self, now: float) -> None:
        self.level, self.updated = self.available(now), now

    def take(self, tokens: int, now: float) -> float | None:
        """Take `tokens` if available: None; else the seconds until they will be."""
        self.refill(now)
        if self.level >= tokens:
            self.level -= tokens
            return None
        return (tokens - self.level) * SECONDS_PER_MINUTE / self.per_minute

    def give_back(self, tokens: int, now: float) -> None:
        self.refill(now)
        self.level = min(float(self.per_minute), self.level + tokens)


@dataclass
class Refusal:
    """Why admission was refused: `retry_after` None means never (the request alone is over
    the key's limit: a 400, not a 429)."""

    message: str
    retry_after: float | None


@dataclass
class Quotas:
    clock: Callable[[], float] = time.monotonic
    in_flight: dict[str, int] = field(default_factory=dict)
    buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def admit(self, key_id: str, max_concurrent: int | None, tokens_per_minute: int | None,
              sequences: int, tokens: int) -> Refusal | None:
        """Reserve `sequences` slots and `tokens` tokens for key `key_id`, or say why not.
        What can never fit is said first (a 400), whatever the key has in flight."""
        if max_concurrent is not None and sequences > max_concurrent:
            return Refusal(f"the request has {sequences} choices; this API key may run at most "
                           f"max_concurrent={max_concurrent} at once", None)
        if tokens_per_minute is not None and tokens > tokens_per_minute:
            return Refusal(f"the request may use {tokens} tokens (choices x (prompt + "
                           f"max_tokens)); this API key's limit is tokens_per_minute="
                           f"{tokens_per_minute}", None)
        if max_concurrent is not None and \
                self.in_flight.get(key_id, 0) + sequences > max_concurrent:
            return Refusal(f"this API key has {self.in_flight.get(key_id, 0)} sequences in "
                           f"flight, its limit is max_concurrent={max_concurrent}; retry when "
                           f"one finishes", 1.0)
        if tokens_per_minute is not None:
            bucket = self.buckets.setdefault(key_id, TokenBucket(tokens_per_minute))
            wait = bucket.take(tokens, self.clock())
            if wait is not None:
                return Refusal(f"this API key is over its tokens_per_minute={tokens_per_minute} "
                               f"(the request may use {tokens}); retry in {wait:.1f} s", wait)
        self.in_flight[key_id] = self.in_flight.get(key_id, 0) + sequences
        return None

    def release(self, key_id: str, sequences: int, unused_tokens: int) -> None:
        left = self.in_flight.get(key_id, 0) - sequences
        if left > 0:
            self.in_flight[key_id] = left
        else:
            self.in_flight.pop(key_id, None)
        bucket = self.buckets.get(key_id)
        if bucket is not None and unused_tokens > 0:
            bucket.give_back(unused_tokens, self.clock())
