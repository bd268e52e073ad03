"""One HTTP generation request on the engine: its `n` engine requests (`<id>-<i>`), their
merged outputs, queue and per-key accounting, metrics, and the abort when the client goes away.

When the client disconnects mid-stream, Starlette cancels the response; `Job.close` (run from
the output generator's `finally` and from the response wrapper) aborts every unfinished engine
request so its pages return to the pool.

Errors keep their cause: a request the engine refuses is a 400, a request the engine failed
(a step raised, non-finite logits, the engine thread died) a 500, a request the engine could
not serve in time or while stopping a 503.
"""
from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Literal

import anyio
from fastapi.responses import StreamingResponse

from lorafleet.api.auth import Grant
from lorafleet.api.metrics import adapter_label
from lorafleet.api.protocol import UsageInfo, new_id
from lorafleet.api.state import ApiError, ServerState
from lorafleet.errors import EngineError, RequestError
from lorafleet.serve import RequestOutput, SamplingParams

Endpoint = Literal["completions", "chat"]

# OpenAI's and vLLM's floor for a reported logprob: -inf is not JSON.
LOGPROB_FLOOR = -9999.0


class JobStatus(str, enum.Enum):
    """The `status` label of the requests metric."""

    OK = "ok"
    ERROR = "error"
    ABORTED = "aborted"


@dataclass
class Choice:
    """What one choice has produced so far."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, dict[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list | None = None     # the engine's, with params.prompt_logprobs


def token_logprobs(out: RequestOutput) -> list[tuple[int, float, dict[int, float]]]:
    """(token id, logprob, {alternative id: logprob}) per new token of a `RequestOutput`.

    The engine reports either one float per token or, for requests with top_logprobs, a dict
    {token_id: logprob} of the most likely tokens and the chosen one (engine.TokenLogprob)."""
    if not out.logprobs:
        return []
    return token_logprobs_of(out.logprobs, out.new_token_ids)


def token_logprobs_of(values, token_ids) -> list:
    """The same for any list of engine logprobs and their tokens; a None value (the first
    prompt token's) stays None."""
    entries = []
    for token_id, value in zip(token_ids, values or []):
        if value is None:
            entries.append(None)
        elif isinstance(value, dict):
            top = {t: max(float(lp), LOGPROB_FLOOR) for t, lp in value.items()}
            entries.append((token_id, top[token_id], top))
        else:
            lp = max(float(value), LOGPROB_FLOOR)
            entries.append((token_id, lp, {token_id: lp}))
    return entries


def output_error(out: RequestOutput) -> ApiError:
    """The HTTP error of an engine request that finished with `error` set."""
    if out.finish_reason == "deadline":
        return ApiError(503, str(out.error), type_="server_error", code="deadline_exceeded",
                        retry_after=1)
    return ApiError(500, str(out.error), type_="server_error", code="engine_error")


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

    def __init__(self, state: ServerState, endpoint: Endpoint, adapter: str | None,
                 prompt_ids: list[int], params: list[SamplingParams], grant: Grant,
                 prompts: list[list[int]] | None = None):
        """prompts: each choice's prompt (a completions batch); default prompt_ids for all."""
        self.state, self.endpoint, self.adapter = state, endpoint, adapter
        self.prompt_ids, self.params, self.grant = prompt_ids, params, grant
        self.prompts = prompts if prompts is not None else [prompt_ids] * len(params)
        # Each distinct prompt counts once in usage, whatever `n` (OpenAI's and vLLM's usage).
        self.prompt_tokens = sum(len(p) for i, p in enumerate(self.prompts)
                                 if i == 0 or p is not self.prompts[i - 1])
        self.id = new_id("cmpl" if endpoint == "completions" else "chatcmpl")
        self.request_ids = [f"{self.id}-{i}" for i in range(len(params))]
        self.choices = [Choice() for _ in params]
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.label = adapter_label(adapter)
        self.status = JobStatus.OK
        self.tasks: list[asyncio.Task] = []
        self.closed = False
        self.admitted = False
        # The most tokens the job can use, reserved against the key's tokens_per_minute.
        self.reserved_tokens = sum(len(ids) + p.max_tokens
                                   for ids, p in zip(self.prompts, params))

    def admit(self) -> None:
        """Take queue slots (429 when the queue or the key's share is full) and mark the
        adapter in use (404 if it was unloaded since the request named it)."""
        state, n = self.state, len(self.params)
        if state.draining:
            raise ApiError(503, "server is shutting down", type_="server_error",
                           code="shutting_down")
        if n > state.config.max_queue:
            raise ApiError(400, f"n={n} is larger than the server's queue "
                                f"(max_queue={state.config.max_queue})", param="n",
                           code="n_too_large")
        if state.outstanding + n > state.config.max_queue:
            raise ApiError(429, f"server queue is full: {state.outstanding} sequences in flight, "
                                f"the limit is max_queue={state.config.max_queue}; retry later",
                           type_="rate_limit_error", code="queue_full", retry_after=1)
        if self.adapter is not None and (not state.engine.has_adapter(self.adapter)
                                         or self.adapter in state.unloading):
            raise ApiError(404, f"model {self.adapter!r} does not exist (it was unloaded)",
                           param="model", code="model_not_found")
        grant = self.grant
        if grant.key_id is not None:
            refusal = state.quotas.admit(grant.key_id, grant.max_concurrent,
                                         grant.tokens_per_minute, n, self.reserved_tokens)
            if refusal is not None:
                if refusal.retry_after is None:
                    raise ApiError(400, refusal.message, code="over_key_limit")
                state.metrics.throttled.labels(grant.key_id).inc()
                raise ApiError(429, refusal.message, type_="rate_limit_error",
                               code="key_rate_limited", retry_after=refusal.retry_after)
        state.outstanding += n
        state.in_use.setdefault(self.adapter, set()).update(self.request_ids)
        state.last_used[self.adapter] = time.time()
        self.admitted = True

    def release(self) -> None:
        if not self.admitted:
            return
        self.admitted = False
        state = self.state
        state.outstanding -= len(self.params)
        users = state.in_use.get(self.adapter, set())
        users.difference_update(self.request_ids)
        if not users:
            state.in_use.pop(self.adapter, None)
        completion = sum(len(c.token_ids) for c in self.choices)
        if self.grant.key_id is not None:
            used = sum(len(p) for p in self.prompts) + completion
            state.quotas.release(self.grant.key_id, len(self.params),
                                 self.reserved_tokens - used)
        state.metrics.observe_request(
            self.label, self.endpoint, self.status.value, self.prompt_tokens, completion,
            time.perf_counter() - self.started,
            [c.finish_reason for c in self.choices] if self.status is JobStatus.OK else [])

    def usage(self) -> UsageInfo:
        completion = sum(len(c.token_ids) for c in self.choices)
        return UsageInfo(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                         total_tokens=self.prompt_tokens + completion)

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, RequestOutput) from every choice's stream, as they come. Raises
        ApiError for a choice the engine refused or failed."""
        engine = self.state.async_engine
        queue: asyncio.Queue = asyncio.Queue()
        finished: set[int] = set()

        async def pump(index: int) -> None:
            try:
                async for out in engine.stream(self.request_ids[index], self.prompts[index],
                                               self.adapter, self.params[index],
                                               tenant=self.grant.key_id):
                    await queue.put((index, out, None))
            except Exception as exc:  # handed to the consumer, which reports it
                await queue.put((index, None, exc))
            await queue.put((index, None, None))

        self.tasks = [asyncio.create_task(pump(i)) for i in range(len(self.params))]
        try:
            while len(finished) < len(self.tasks):
                index, out, exc = await queue.get()
                if exc is not None:
                    self.status = JobStatus.ERROR
                    error = _engine_exception(exc)
                    if error is exc:
                        raise error
                    raise error from exc
                if out is None:
                    finished.add(index)
                    continue
                if out.error:
                    self.status = JobStatus.ERROR
                    raise output_error(out)
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
            if self.status is JobStatus.OK:
                self.status = JobStatus.ABORTED
            self.state.metrics.aborted.labels(self.label).inc()
            for rid in unfinished:
                await self.state.async_engine.abort(rid)
        self.release()

    def _record(self, index: int, out: RequestOutput) -> None:
        choice = self.choices[index]
        if out.new_token_ids and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            self.state.metrics.observe_ttft(self.label, self.first_token_at - self.started)
        choice.text += out.new_text or ""
        choice.token_ids.extend(out.new_token_ids)
        choice.logprobs.extend(token_logprobs(out))
        if out.prompt_logprobs is not None:
            choice.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            choice.finish_reason = out.finish_reason or "stop"

    async def collect(self) -> None:
        async for _ in self.events():
            pass


def _engine_exception(exc: Exception) -> Exception:
    """What an exception from the engine's `stream` becomes for the client."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestError):  # the engine refused the request itself
        return ApiError(400, str(exc), code="engine_rejected")
    if isinstance(exc, EngineError):   # the engine is stopping or stopped
        return ApiError(503, str(exc), type_="server_error", code="engine_unavailable",
                        retry_after=1)
    return ApiError(500, f"engine error: {type(exc).__name__}: {exc}", type_="server_error",
                    code="engine_error")
