"""One HTTP generation request on the engine: its `n` engine requests (`<id>-<i>`), their
merged outputs, queue accounting, metrics, and the abort when the client goes away.

When the client disconnects mid-stream, Starlette cancels the response; `Job.close` (run from
the output generator's `finally` and from the response wrapper) aborts every unfinished engine
request so its pages return to the pool.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import anyio
from fastapi.responses import StreamingResponse

from lorafleet.api.metrics import adapter_label
from lorafleet.api.protocol import UsageInfo, new_id
from lorafleet.api.server import ApiError, ServerState
from lorafleet.errors import EngineError, RequestError


@dataclass
class Choice:
    """What one choice has produced so far."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, dict[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None


def token_logprobs(out: Any) -> list[tuple[int, float, dict[int, float]]]:
    """(token id, logprob, {alternative id: logprob}) per new token of a `RequestOutput`.

    The engine reports either one float per token or, for requests with top_logprobs, a dict
    {token_id: logprob} of the most likely tokens and the chosen one (engine.TokenLogprob)."""
    if not out.logprobs:
        return []
    entries = []
    for token_id, value in zip(out.new_token_ids, out.logprobs):
        if isinstance(value, dict):
            entries.append((token_id, value[token_id], value))
        else:
            entries.append((token_id, float(value), {token_id: float(value)}))
    return entries


class JobStreamingResponse(StreamingResponse):
    """A streaming response that always closes its job, even when the client disconnects
    before the body generator has started (its own `finally` would then never run)."""

    def __init__(self, content: AsyncIterator[str], job: "Job"):
        super().__init__(content, media_type="text/event-stream")
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.job.close()


class Job:
    """One HTTP generation request: its engine requests, accounting and merged output."""

    def __init__(self, state: ServerState, endpoint: str, adapter: str | None,
                 prompt_ids: list[int], params: list[Any]):
        self.state, self.endpoint, self.adapter = state, endpoint, adapter
        self.prompt_ids, self.params = prompt_ids, params
        self.id = new_id("cmpl" if endpoint == "completions" else "chatcmpl")
        self.request_ids = [f"{self.id}-{i}" for i in range(len(params))]
        self.choices = [Choice() for _ in params]
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.label = adapter_label(adapter)
        self.status = "ok"
        self.tasks: list[asyncio.Task] = []
        self.closed = False

    def admit(self) -> None:
        """Take queue slots (429 when the queue is full) and mark the adapter in use."""
        state, n = self.state, len(self.params)
        if state.draining:
            raise ApiError(503, "server is shutting down", type_="server_error",
                           code="shutting_down")
        if state.outstanding + n > state.config.max_queue:
            raise ApiError(429, f"server queue is full: {state.outstanding} sequences in flight, "
                                f"the limit is max_queue={state.config.max_queue}; retry later",
                           type_="rate_limit_error", code="queue_full")
        state.outstanding += n
        state.in_use.setdefault(self.adapter, set()).update(self.request_ids)

    def release(self) -> None:
        state = self.state
        state.outstanding -= len(self.params)
        users = state.in_use.get(self.adapter, set())
        users.difference_update(self.request_ids)
        if not users:
            state.in_use.pop(self.adapter, None)
        metrics = state.metrics
        metrics.requests.labels(self.label, self.endpoint, self.status).inc()
        metrics.prompt_tokens.labels(self.label).inc(len(self.prompt_ids))
        metrics.completion_tokens.labels(self.label).inc(
            sum(len(c.token_ids) for c in self.choices))
        metrics.latency.labels(self.label).observe(time.perf_counter() - self.started)

    def usage(self) -> UsageInfo:
        completion = sum(len(c.token_ids) for c in self.choices)
        return UsageInfo(prompt_tokens=len(self.prompt_ids), completion_tokens=completion,
                         total_tokens=len(self.prompt_ids) + completion)

    async def events(self) -> AsyncIterator[tuple[int, Any]]:
        """(choice index, RequestOutput) from every choice's stream, as they come."""
        engine = self.state.async_engine
        queue: asyncio.Queue = asyncio.Queue()
        finished: set[int] = set()

        async def pump(index: int) -> None:
            try:
                async for out in engine.stream(self.request_ids[index], self.prompt_ids,
                                               self.adapter, self.params[index]):
                    await queue.put((index, out, None))
            except Exception as exc:  # handed to the consumer, which reports it
                await queue.put((index, None, exc))
            await queue.put((index, None, None))

        self.tasks = [asyncio.create_task(pump(i)) for i in range(len(self.params))]
        try:
            while len(finished) < len(self.tasks):
                index, out, exc = await queue.get()
                if exc is not None:
                    self.status = "error"
                    raise exc
                if out is None:
                    finished.add(index)
                    continue
                if getattr(out, "error", None):
                    self.status = "error"
                    raise RequestError(str(out.error))
                self._record(index, out)
                yield index, out
        finally:
            # The response may be being cancelled (client gone): shield so the aborts still run.
            with anyio.CancelScope(shield=True):
                await self.close()

    async def close(self) -> None:
        """Abort unfinished engine requests (their pages go back to the pool) and give back the
        queue slots. Idempotent: runs from `events` and from the response wrapper."""
        if self.closed:
            return
        self.closed = True
        for task in self.tasks:
            task.cancel()
        unfinished = [rid for i, rid in enumerate(self.request_ids)
                      if self.choices[i].finish_reason is None]
        if unfinished:
            if self.status == "ok":
                self.status = "aborted"
            self.state.metrics.aborted.labels(self.label).inc()
            for rid in unfinished:
                await self.state.async_engine.abort(rid)
        self.release()

    def _record(self, index: int, out: Any) -> None:
        choice = self.choices[index]
        if out.new_token_ids and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            self.state.metrics.ttft.labels(self.label).observe(self.first_token_at - self.started)
        choice.text += out.new_text or ""
        choice.token_ids.extend(out.new_token_ids)
        choice.logprobs.extend(token_logprobs(out))
        if out.finished:
            choice.finish_reason = out.finish_reason or "stop"

    async def collect(self) -> None:
        try:
            async for _ in self.events():
                pass
        except RequestError as exc:
            raise ApiError(400, str(exc), code="engine_rejected") from exc
        except EngineError as exc:  # the engine is stopping: the request was not served
            raise ApiError(503, str(exc), type_="server_error", code="engine_unavailable") from exc
