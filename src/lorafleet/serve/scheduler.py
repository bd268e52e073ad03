"""Continuous (iteration-level) batching, as nano-vllm's scheduler, with chunked prefill
(Sarathi-Serve; vLLM's `enable_chunked_prefill`): every step runs one token for every decoding
request and fills the rest of a token budget with prefill chunks, so decode never waits behind a
long prompt.

Plain Python, no torch: it moves `Sequence`s between queues, asks the KV cache manager and the
adapter cache for pages, and says how many tokens each sequence runs this step. A step
(`enable_chunked_prefill`, the default):

1. decode rows: every running sequence past its prefill, one token each (the one it sampled
   last step); out of pages, first evict adapters no running request uses, then preempt the
   most recently admitted request (free its KV, requeue it at the front; its prompt and output
   so far are recomputed later). Never an error: `Engine.add_request` refuses any request that
   could not fit the pool alone, so the oldest running request can always proceed;
2. prefill chunks, while `max_num_batched_tokens` (decode rows count one each) has room: first
   the running sequences whose prompt is partly computed (oldest first), then waiting requests
   (admission, below). Admission needs free pages for the KV of the whole current sequence (so
   a chunked prompt never waits for pages half way, and two half-prefilled prompts cannot
   deadlock) plus the adapter's pages when it is not resident, and respects the optional cap on
   distinct adapters in the running batch (each distinct adapter costs one more low-rank
   product per target module per step). A sequence samples its first token on the step its
   last chunk runs.

Admission order. Waiting requests are taken round-robin across tenants (`seq.tenant`, the API
key; the tenant served least recently first), first come first served within one, so a flood
from one tenant does not queue the others behind it. A request that cannot be admitted now
(its adapter is still being read from disk, no pages, the adapter cap) is passed over, not
waited for: requests whose adapter is resident or on the host go first, and the adapter cache
reads the others meanwhile (no thrashing on loads). Aging bounds the passing over: once more
than `max_overtakes` later requests have been admitted ahead of a request, it is admitted before
any other, and admission stops behind it until it fits (no starvation).

With `enable_chunked_prefill=False` a step is either all prefill (whole prompts, admitted while
the budget holds; the first one whatever its length) or, when nothing is admitted, all decode.

S-LoRA's early abort: a request still waiting for its first token past its deadline is dropped.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from lorafleet.errors import ConfigError

from .kv_cache import KVCacheManager
from .sequence import Sequence, SeqStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_adapters_per_step: int | None = None
    first_token_deadline_s: float | None = None
    enable_chunked_prefill: bool = True
    # Aging bound: how many later requests may be admitted ahead of a waiting one. About two
    # full batches: enough to route around a slow adapter load, small enough that a passed-over
    # request waits a few batches at most.
    max_overtakes: int = 128

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_overtakes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ScheduledBatch:
    """`seqs[i]` runs `num_new_tokens[i]` tokens from its `num_computed_tokens` on. The first
    `num_decode` are decode rows (one token each), the others prefill chunks."""
    seqs: list[Sequence]
    num_new_tokens: list[int]
    num_decode: int
    aborted: list[Sequence] = field(default_factory=list)   # early-aborted (deadline)
    num_preempted: int = 0

    @property
    def is_prefill(self) -> bool:
        """The step has prefill tokens (with chunked prefill, possibly beside decode rows)."""
        return self.num_decode < len(self.seqs)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.num_new_tokens[self.num_decode:])


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, adapters, clock=time.monotonic):
        """`adapters` is the adapter cache (pin / unpin / reclaim / prefetch / ready, and
        `resident`: the names in the pool)."""
        self.config, self.kv, self.adapters, self.clock = config, kv, adapters, clock
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_admitted = 0
        self.queue_wait_seconds = 0.0      # first admissions: sum of (admission - arrival)
        self.tenant_served: dict[str | None, int] = {}   # tenant -> num_admitted when last served

    def add(self, seq: Sequence) -> None:
        seq.admissions_at_arrival, seq.queue_ahead_at_arrival = self.num_admitted, len(self.waiting)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step's decision -----------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        aborted = self._early_abort()
        preempted_before = self.num_preemptions
        if self.config.enable_chunked_prefill:
            batch = self._schedule_mixed()
        else:
            batch = self._schedule_prefill_or_decode()
        batch.aborted = aborted
        batch.num_preempted = self.num_preemptions - preempted_before
        self._prefetch()
        return batch

    def _schedule_mixed(self) -> ScheduledBatch:
        decode = [s for s in self._grow_running() if not s.is_prefilling]
        budget = self.config.max_num_batched_tokens - len(decode)
        chunks = []
        for seq in self.running:               # partly prefilled prompts continue first
            if budget <= 0:
                break
            if seq.is_prefilling:
                chunks.append((seq, min(seq.num_pending_tokens, budget)))
                budget -= chunks[-1][1]
        if budget > 0:
            chunks += self._admit(budget, chunked=True)
        return ScheduledBatch(decode + [seq for seq, _ in chunks],
                              [1] * len(decode) + [n for _, n in chunks], len(decode))

    def _schedule_prefill_or_decode(self) -> ScheduledBatch:
        admitted = self._admit(self.config.max_num_batched_tokens, chunked=False)
        if admitted:
            return ScheduledBatch([seq for seq, _ in admitted], [n for _, n in admitted], 0)
        decode = self._grow_running()
        return ScheduledBatch(decode, [1] * len(decode), len(decode))

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

    def _admit(self, budget: int, chunked: bool) -> list[tuple[Sequence, int]]:
        """Move waiting requests to running while `budget` tokens remain, in admission order
        (module docstring). Returns (sequence, tokens it runs this step): a chunk of at most the
        budget when `chunked`, else the whole sequence (the first one of a step whatever its
        length: add_request bounds it)."""
        admitted = []
        if not self.waiting or len(self.running) >= self.config.max_num_seqs:
            return admitted
        running_adapters = {s.adapter for s in self.running if s.adapter is not None}
        cap = self.config.max_adapters_per_step
        # Once a request lacked pages, later ones are tried only if their adapter is resident
        # (or none): bringing one in could evict another that a queued request needs next.
        short = False
        for seq in self._admission_order():
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            num_tokens = seq.num_tokens
            new_adapter = seq.adapter is not None and seq.adapter not in running_adapters
            needs_load = seq.adapter is not None and seq.adapter not in self.adapters.resident
            fits = ((chunked or not admitted or num_tokens <= budget)
                    and not (new_adapter and cap is not None and len(running_adapters) >= cap)
                    and not (short and needs_load))
            if fits and not self._take_pages(seq, num_tokens):
                fits = False
                # A request whose adapter is still being read did not lack pages.
                short = short or seq.adapter is None or self.adapters.ready(seq.adapter)
            if not fits:
                if self._aged(seq):
                    break          # everything waits behind it until it fits
                continue
            self.waiting.remove(seq)
            if not seq.num_preemptions:
                self.queue_wait_seconds += self.clock() - seq.arrival_time
            seq.status = SeqStatus.RUNNING
            seq.prefill_end = num_tokens
            self.running.append(seq)
            self.num_admitted += 1
            self.tenant_served[seq.tenant] = self.num_admitted
            num_new = min(num_tokens, budget) if chunked else num_tokens
            admitted.append((seq, num_new))
            budget -= num_new
            if seq.adapter is not None:
                running_adapters.add(seq.adapter)
        return admitted

    def _take_pages(self, seq: Sequence, num_tokens: int) -> bool:
        """Pin the adapter and allocate the KV pages of `seq`, or change nothing."""
        kv_pages = self.kv.pages_needed(seq.request_id, num_tokens)
        if seq.adapter is not None and not self.adapters.pin(seq.adapter, reserve=kv_pages):
            return False
        seq.adapter_pinned = seq.adapter is not None
        if not self._make_room(kv_pages):
            self._unpin(seq)
            return False
        self.kv.grow(seq.request_id, num_tokens)
        return True

    def _aged(self, seq: Sequence) -> bool:
        """More than `max_overtakes` requests that came after `seq` were admitted before it."""
        overtakes = (self.num_admitted - seq.admissions_at_arrival) - seq.queue_ahead_at_arrival
        return overtakes > self.config.max_overtakes

    def _admission_order(self) -> list[Sequence]:
        """Aged requests first (oldest first), then one request per tenant in turn, the tenant
        served least recently first; queue order within a tenant. O(waiting)."""
        aged, by_tenant = [], {}
        for seq in self.waiting:
            if self._aged(seq):
                aged.append(seq)
            else:
                by_tenant.setdefault(seq.tenant, []).append(seq)
        if len(by_tenant) <= 1:
            return aged + next(iter(by_tenant.values()), [])
        queues = sorted(by_tenant.items(), key=lambda item: self.tenant_served.get(item[0], -1))
        order, depth = aged, 0
        while queues:
            queues = [(tenant, q) for tenant, q in queues if depth < len(q)]
            order += [q[depth] for _, q in queues]
            depth += 1
        return order

    def _grow_running(self) -> list[Sequence]:
        """Give every running sequence the pages for all its tokens (a decode row needs room
        for the token it runs; a partly prefilled prompt has its pages from admission),
        preempting the most recently admitted ones while the pool is short. Returns those
        kept, oldest first (also the new `running`)."""
        queue, kept = deque(self.running), []
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
                kept.append(seq)
        self.running = kept
        return kept

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
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.admissions_at_arrival, seq.queue_ahead_at_arrival = self.num_admitted, 0
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

    def fail_waiting(self, adapter: str, message: str) -> list[Sequence]:
        """End every waiting request on `adapter` with an error (its file failed to load)."""
        failed = [seq for seq in self.waiting if seq.adapter == adapter]
        for seq in failed:
            self.waiting.remove(seq)
            self._finish(seq, "error")
            seq.error = message
        return failed

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._finish(seq, "abort")
                    return seq
        return None
