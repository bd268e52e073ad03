"""POST /v1/completions and /v1/chat/completions: validate, admit, run on the engine, answer
(one JSON body, or SSE `data: {...}` chunks ending with `data: [DONE]`).

A request with `n` choices becomes `n` engine requests `<id>-<i>`; their streams are merged.
With a `seed`, choice i samples with `seed + i` so the choices differ yet are reproducible.
When the client goes away mid-stream, Starlette cancels the response; the `finally` of
`Job.events` aborts every unfinished engine request so its pages return to the pool.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from lorafleet.api.metrics import adapter_label
from lorafleet.api.protocol import (ChatChoiceLogprobs, ChatCompletionChoice,
                                    ChatCompletionChunk, ChatCompletionRequest,
                                    ChatCompletionResponse, ChatResponseMessage,
                                    ChatStreamChoice, ChatTokenLogprob, CompletionChoice,
                                    CompletionChunk, CompletionLogprobs, CompletionRequest,
                                    CompletionResponse, DeltaMessage, UsageInfo, error_body,
                                    new_id)
from lorafleet.api.server import ApiError, ServerState, authorize, parse_body, resolve_model
from lorafleet.errors import EngineError, LoraFleetError, RequestError


@dataclass
class Choice:
    """What one choice has produced so far."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, dict[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None


def token_logprobs(out: Any) -> list[tuple[int, float, dict[int, float]]]:
    """(token id, logprob, {alternative id: logprob}) per new token of a `RequestOutput`.

    The engine reports either one float per token or a dict {token_id: logprob} of the top
    alternatives (the chosen token included)."""
    if not out.logprobs:
        return []
    entries = []
    for token_id, value in zip(out.new_token_ids, out.logprobs):
        if isinstance(value, dict):
            top = {int(k): float(v) for k, v in value.items()}
            entries.append((token_id, top.get(token_id, max(top.values())), top))
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
                    raise exc
                if out is None:
                    finished.add(index)
                    continue
                if getattr(out, "error", None):
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
            self.status = "error"
            raise ApiError(400, str(exc), code="engine_rejected") from exc
        except EngineError as exc:  # the engine is stopping: the request was not served
            self.status = "error"
            raise ApiError(503, str(exc), type_="server_error", code="engine_unavailable") from exc


# ---- request -> engine inputs ------------------------------------------------------------------

def _sampling_params(body, max_tokens: int, logprobs: bool, n: int) -> list[Any]:
    from lorafleet.serve import SamplingParams
    return [SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                           top_k=body.top_k, seed=None if body.seed is None else body.seed + i,
                           stop=body.stop, logprobs=logprobs, ignore_eos=body.ignore_eos)
            for i in range(n)]


def _check_lengths(state: ServerState, prompt_ids: list[int], max_tokens: int | None,
                   param: str) -> int:
    """Validate prompt and max_tokens against the limits; returns the max_tokens to use."""
    config = state.config
    if not prompt_ids:
        raise ApiError(400, "the prompt is empty (0 tokens)", param=param, code="empty_prompt")
    if len(prompt_ids) >= config.max_model_len:
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; the limit is "
                            f"max_model_len={config.max_model_len} tokens including the "
                            f"completion", param=param, code="context_length_exceeded")
    room = config.max_model_len - len(prompt_ids)
    if max_tokens is None:
        return min(room, config.max_tokens_limit)
    if max_tokens > config.max_tokens_limit:
        raise ApiError(400, f"max_tokens={max_tokens} is larger than the limit "
                            f"max_tokens_limit={config.max_tokens_limit}", param="max_tokens",
                       code="max_tokens_exceeded")
    if max_tokens > room:
        raise ApiError(400, f"max_tokens={max_tokens} plus the prompt's {len(prompt_ids)} tokens "
                            f"exceeds max_model_len={config.max_model_len}", param="max_tokens",
                       code="context_length_exceeded")
    return max_tokens


def _encode_prompt(state: ServerState, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return list(state.tokenizer.encode(prompt))
    vocab = state.config.vocab_size
    if vocab is not None:
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary "
                                f"[0, {vocab})", param="prompt", code="invalid_token")
    return list(prompt)


def _encode_chat(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        # tokenize=True encodes without adding special tokens: the template writes them.
        return list(state.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                        tokenize=True))
    except LoraFleetError as exc:  # no template: the server's setup, said plainly
        raise ApiError(400, f"chat is unavailable: {exc}", param="messages",
                       code="no_chat_template") from exc
    except Exception as exc:  # a template error is the request's fault, not the server's
        raise ApiError(400, f"messages cannot be rendered by the chat template: {exc}",
                       param="messages", code="chat_template_error") from exc


def _sse(payload: Any) -> str:
    body = payload if isinstance(payload, dict) else payload.model_dump()
    return f"data: {json.dumps(body)}\n\n"


def _token_text(state: ServerState, token_id: int) -> str:
    return state.tokenizer.decode([token_id])


# ---- responses -----------------------------------------------------------------------------------

def _completion_logprobs(state, entries, offset: int) -> CompletionLogprobs:
    result = CompletionLogprobs()
    for token_id, logprob, top in entries:
        token = _token_text(state, token_id)
        result.tokens.append(token)
        result.token_logprobs.append(logprob)
        result.top_logprobs.append({_token_text(state, t): lp for t, lp in top.items()})
        result.text_offset.append(offset)
        offset += len(token)
    return result


def _chat_logprobs(state, entries, top_n: int) -> ChatChoiceLogprobs:
    content = []
    for token_id, logprob, top in entries:
        token = _token_text(state, token_id)
        alternatives = sorted(top.items(), key=lambda kv: -kv[1])[:top_n]
        content.append(ChatTokenLogprob(
            token=token, logprob=logprob, bytes=list(token.encode()),
            top_logprobs=[{"token": _token_text(state, t), "logprob": lp,
                           "bytes": list(_token_text(state, t).encode())}
                          for t, lp in alternatives]))
    return ChatChoiceLogprobs(content=content)


def add_generation_routes(app: FastAPI, state: ServerState) -> None:

    @app.post("/v1/completions")
    async def completions(request: Request):
        grant = authorize(request)
        body = await parse_body(request, CompletionRequest)
        adapter = resolve_model(state, grant, body.model)
        prompt_ids = _encode_prompt(state, body.prompt)
        max_tokens = _check_lengths(state, prompt_ids, body.max_tokens, "prompt")
        want_logprobs = body.logprobs is not None
        job = Job(state, "completions", adapter, prompt_ids,
                  _sampling_params(body, max_tokens, want_logprobs, body.n))
        echo = (body.prompt if isinstance(body.prompt, str)
                else state.tokenizer.decode(prompt_ids)) if body.echo else ""
        job.admit()
        if body.stream:
            return JobStreamingResponse(_stream_completion(state, job, body, echo), job)
        await job.collect()
        choices = [CompletionChoice(
            index=i, text=echo + c.text, finish_reason=c.finish_reason,
            logprobs=_completion_logprobs(state, c.logprobs, len(echo)) if want_logprobs
            else None) for i, c in enumerate(job.choices)]
        return CompletionResponse(id=job.id, model=body.model, choices=choices,
                                  usage=job.usage()).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        grant = authorize(request)
        body = await parse_body(request, ChatCompletionRequest)
        adapter = resolve_model(state, grant, body.model)
        prompt_ids = _encode_chat(state, body)
        requested = body.max_completion_tokens or body.max_tokens
        max_tokens = _check_lengths(state, prompt_ids, requested, "messages")
        job = Job(state, "chat", adapter, prompt_ids,
                  _sampling_params(body, max_tokens, body.logprobs, body.n))
        job.admit()
        if body.stream:
            return JobStreamingResponse(_stream_chat(state, job, body), job)
        await job.collect()
        top_n = body.top_logprobs or 0
        choices = [ChatCompletionChoice(
            index=i, message=ChatResponseMessage(content=c.text), finish_reason=c.finish_reason,
            logprobs=_chat_logprobs(state, c.logprobs, top_n) if body.logprobs else None)
            for i, c in enumerate(job.choices)]
        return ChatCompletionResponse(id=job.id, model=body.model, choices=choices,
                                      usage=job.usage()).model_dump()


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.get("include_usage"))


async def _stream_completion(state: ServerState, job: Job, body: CompletionRequest,
                             echo: str) -> AsyncIterator[str]:
    offsets = [len(echo)] * len(job.choices)
    try:
        if echo:
            for i in range(len(job.choices)):
                yield _sse(CompletionChunk(id=job.id, model=body.model,
                                           choices=[CompletionChoice(index=i, text=echo)]))
        async for index, out in job.events():
            entries = token_logprobs(out)
            logprobs = (_completion_logprobs(state, entries, offsets[index])
                        if body.logprobs is not None else None)
            offsets[index] += len(out.new_text or "")
            choice = CompletionChoice(index=index, text=out.new_text or "", logprobs=logprobs,
                                      finish_reason=job.choices[index].finish_reason
                                      if out.finished else None)
            yield _sse(CompletionChunk(id=job.id, model=body.model, choices=[choice]))
        if _include_usage(body):
            yield _sse(CompletionChunk(id=job.id, model=body.model, choices=[],
                                       usage=job.usage()))
    except EngineError as exc:
        job.status = "error"
        yield _sse(error_body(str(exc), "invalid_request_error", code="engine_rejected"))
    yield "data: [DONE]\n\n"


async def _stream_chat(state: ServerState, job: Job,
                       body: ChatCompletionRequest) -> AsyncIterator[str]:
    def chunk(choices, usage=None):
        return _sse(ChatCompletionChunk(id=job.id, model=body.model, choices=choices,
                                        usage=usage))
    try:
        for i in range(len(job.choices)):
            yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant",
                                                                      content=""))])
        async for index, out in job.events():
            logprobs = (_chat_logprobs(state, token_logprobs(out), body.top_logprobs or 0)
                        if body.logprobs else None)
            if out.new_text or logprobs:
                yield chunk([ChatStreamChoice(index=index, delta=DeltaMessage(
                    content=out.new_text or ""), logprobs=logprobs)])
            if out.finished:
                yield chunk([ChatStreamChoice(index=index, delta=DeltaMessage(),
                                              finish_reason=job.choices[index].finish_reason)])
        if _include_usage(body):
            yield chunk([], usage=job.usage())
    except EngineError as exc:
        job.status = "error"
        yield _sse(error_body(str(exc), "invalid_request_error", code="engine_rejected"))
    yield "data: [DONE]\n\n"
