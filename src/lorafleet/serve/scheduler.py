"""Continuous (iteration-level) batching, as nano-vllm's scheduler: every step either admits
waiting requests for prefill or runs one decode token for every running request.

Plain Python, no torch: it moves `Sequence`s between queues and asks the KV cache manager and the
adapter cache for pages. Policies:

- first come, first served: the head of the queue blocks those behind it (no starvation);
- admission by free pages (KV for the whole current sequence + the adapter's pages when it is
  not resident) and by a token budget per step;
- optional cap on distinct adapters in the running batch (each distinct adapter costs one more
  low-rank product per target module per step);
- out of pages while decoding: first evict adapters no running request uses, then preempt the
  most recently admitted request (free its KV, requeue it at the front; its prompt and output so
  far are recomputed later). Never an error: `Engine.add_request` refuses any request that could
  not fit the pool alone, so the oldest running request can always proceed;
- S-LoRA's early abort: a request still waiting for its first token past its deadline is dropped.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .kv_cache import KVCacheManager
from .sequence import Sequence, SeqStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_adapters_per_step: int | None = None
    first_token_deadline_s: float | None = None


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    is_prefill: bool
    aborted: list[Sequence] = field(default_factory=list)   # early-aborted (deadline)
    num_preempted: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, adapters, clock=time.monotonic):
        """`adapters` is the adapter cache (pin / unpin / reclaim / prefetch)."""
        self.config, self.kv, self.adapters, self.clock = config, kv, adapters, clock
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step's decision -----------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        aborted = self._early_abort()
        admitted = self._admit()
        if admitted:
            batch = ScheduledBatch(admitted, is_prefill=True, aborted=aborted)
        else:
            preempted_before = self.num_preemptions
            batch = ScheduledBatch(self._decode(), is_prefill=False, aborted=aborted)
            batch.num_preempted = self.num_preemptions - preempted_before
        self._prefetch()
        return batch

    def _early_abort(self) -> list[Sequence]:
        deadline = self.config.first_token_deadline_s
        if deadline is None:
            return []
        now, aborted = self.clock(), []
        for seq in list(self.waiting):
            if not seq.output_ids and now - seq.arrival_time > deadline:
                self.waiting.remove(seq)
                self._finish(seq, "deadline")
                aborted.append(seq)
        return aborted

    def _admit(self) -> list[Sequence]:
        admitted, budget = [], 0
        running_adapters = {s.adapter for s in self.running if s.adapter is not None}
        cap = self.config.max_adapters_per_step
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_tokens = seq.num_tokens
            # The first request of a step is admitted whatever its length (add_request bounds it).
            if admitted and budget + num_tokens > self.config.max_num_batched_tokens:
                break
            new_adapter = seq.adapter is not None and seq.adapter not in running_adapters
            if new_adapter and cap is not None and len(running_adapters) >= cap:
                break
            kv_pages = self.kv.pages_needed(seq.request_id, num_tokens)
            if seq.adapter is not None and not self.adapters.pin(seq.adapter, reserve=kv_pages):
                break
            seq.adapter_pinned = seq.adapter is not None
            if not self._make_room(kv_pages):
                self._unpin(seq)
                break
            self.kv.grow(seq.request_id, num_tokens)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            budget += num_tokens
            if seq.adapter is not None:
                running_adapters.add(seq.adapter)
        return admitted

    def _decode(self) -> list[Sequence]:
        queue, scheduled = deque(self.running), []
        while queue:
            seq = queue.popleft()
            need = self.kv.pages_needed(seq.request_id, seq.num_tokens)
            while not self._make_room(need):
                if queue:
                    self._preempt(queue.pop())        # the most recently admitted one
                else:
                    self._preempt(seq)
                    seq = None
                    break
            if seq is not None:
                self.kv.grow(seq.request_id, seq.num_tokens)
                scheduled.append(seq)
        self.running = scheduled
        return scheduled

    def _make_room(self, num_pages: int) -> bool:
        pool = self.kv.pool
        if num_pages > pool.num_free:
            self.adapters.reclaim(num_pages - pool.num_free)
        return num_pages <= pool.num_free

    def _prefetch(self) -> None:
        """Load the adapters of the next queued requests into free pages now (S-LoRA sec. 5.2),
        so their admission does not wait for a copy. Only free pages are used: prefetching
        never evicts and never pins, so prefetched adapters are the first to be reclaimed."""
        for seq in list(self.waiting)[: self.config.max_num_seqs]:
            if seq.adapter is not None:
                self.adapters.prefetch(seq.adapter)

    # ---- state changes -----------------------------------------------------------------------

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq.request_id)
        self._unpin(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _unpin(self, seq: Sequence) -> None:
        if seq.adapter_pinned:
            self.adapters.unpin(seq.adapter)
            seq.adapter_pinned = False

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.kv.free(seq.request_id)
        self._unpin(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def finish(self, seq: Sequence, reason: str) -> None:
        """The engine ends a running request (EOS, stop, length): its pages are freed at once."""
        if seq in self.running:
            self.running.remove(seq)
        self._finish(seq, reason)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._finish(seq, "abort")
                    return seq
        return None
