"""POST /v1/completions and /v1/chat/completions: validate, admit, run on the engine, answer
(one JSON body, or SSE `data: {...}` chunks ending with `data: [DONE]`; an error after the
stream has started is one `data: {"error": ...}` event, then `[DONE]`).

With `n` choices and a `seed`, choice i samples with `seed + i` so the choices differ yet the
response is reproducible. Tokenizing and chat-template rendering run in a worker thread: a
multi-MB prompt must not stall the event loop (health checks, other streams). The engine side of
a request (and its abort on disconnect) is `Job`.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator

import anyio
from fastapi import APIRouter, Request

from lorafleet.api.access import open_request, resolve_model
from lorafleet.api.job import Job, JobStreamingResponse, token_logprobs, token_logprobs_of
from lorafleet.api.protocol import (ChatChoiceLogprobs, ChatCompletionChoice,
                                    ChatCompletionChunk, ChatCompletionRequest,
                                    ChatCompletionResponse, ChatResponseMessage,
                                    ChatStreamChoice, ChatTokenLogprob, CompletionChoice,
                                    CompletionChunk, CompletionLogprobs, CompletionRequest,
                                    CompletionResponse, DeltaMessage)
from lorafleet.api.state import GENERATION_DEFAULT_KEYS, ApiError, ServerState
from lorafleet.errors import LoraFleetError
from lorafleet.serve import SamplingParams

log = logging.getLogger(__name__)

# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 0.25

router = APIRouter()


async def collect_unless_disconnected(request: Request, job: Job) -> None:
    """Run a non-streaming job to the end; abort it if the client hangs up first (nobody would
    read the answer, and its pages are better spent on others). If this handler is cancelled
    (shutdown past --drain-timeout) the collecting task is cancelled with it, not left behind."""
    task = asyncio.create_task(job.collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ApiError(499, "client closed the request", code="client_closed")
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, ApiError):
                pass
        # A task cancelled before it ran never reached `events`, whose `finally` closes the
        # job: close it here (idempotent) so its queue slots and key quota come back.
        with anyio.CancelScope(shield=True):
            await job.close()


# ---- request -> engine inputs ------------------------------------------------------------------

def _sampling_params(state: ServerState, body, max_tokens: int, logprobs: bool,
                     top_logprobs: int, n: int, prompt_logprobs: int | None = None
                     ) -> list[SamplingParams]:
    given = body.model_fields_set
    defaults = state.config.generation_defaults
    options = {}
    for name in GENERATION_DEFAULT_KEYS:     # a model's generation_config.json sets these
        value = getattr(body, name)
        if (name not in given or value is None) and name in defaults:
            value = defaults[name]
        if value is not None:
            options[name] = value
    response_format = body.response_format or {}
    try:
        return [SamplingParams(
            max_tokens=max_tokens, seed=None if body.seed is None else body.seed + i,
            stop=body.stop, logprobs=logprobs, top_logprobs=top_logprobs,
            ignore_eos=body.ignore_eos, presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0, logit_bias=body.logit_bias,
            stop_token_ids=body.stop_token_ids or [], min_tokens=min(body.min_tokens or 0,
                                                                    max_tokens),
            prompt_logprobs=prompt_logprobs,
            json_object=response_format.get("type") == "json_object", **options)
            for i in range(n)]
    except LoraFleetError as exc:   # e.g. a generation_config value out of range
        raise ApiError(400, str(exc), code="invalid_sampling_params") from exc


def _log_request(state: ServerState, job, body) -> None:
    if state.config.log_requests:
        p = job.params[0]
        log.info("request %s: model=%r prompts=%d prompt_tokens=%s n=%d max_tokens=%d "
                 "temperature=%s top_p=%s top_k=%s stream=%s key=%s", job.id, body.model,
                 len(job.prompts), [len(x) for x in job.prompts][:8], body.n, p.max_tokens,
                 p.temperature, p.top_p, p.top_k, body.stream, job.grant.key_id)


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


def check_token_ids(state: ServerState, ids: list[int], param: str) -> None:
    """400 naming `param` when a token id is outside the model's vocabulary."""
    vocab = state.config.vocab_size
    if vocab is not None:
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"{param}: token id {bad[0]} is outside the vocabulary "
                                f"[0, {vocab})", param=param, code="invalid_token")


def _encode_prompt(state: ServerState, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return list(state.tokenizer.encode(prompt))
    check_token_ids(state, prompt, "prompt")
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
    """OpenAI's legacy shape: per position the token's text, its logprob, and {text: logprob}
    of the `logprobs` most likely tokens plus the chosen one (so up to logprobs + 1 entries)."""
    result = CompletionLogprobs()
    for token_id, logprob, top in entries:
        token = _token_text(state, token_id)
        result.tokens.append(token)
        result.token_logprobs.append(logprob)
        alternatives: dict[str, float] = {}
        for t, lp in sorted(top.items(), key=lambda kv: -kv[1]):
            # Two ids with the same text (e.g. both half a UTF-8 character) share one key:
            # the likelier one keeps it.
            alternatives.setdefault(_token_text(state, t), lp)
        result.top_logprobs.append(alternatives)
        result.text_offset.append(offset)
        offset += len(token)
    return result


def _chat_logprobs(state, entries, top_n: int) -> ChatChoiceLogprobs:
    """Per token {token, logprob, bytes, top_logprobs}: the top_n most likely tokens, in
    order (the chosen one only when it is among them)."""
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


def _echo_logprobs(state, prompt_ids: list[int], entries) -> CompletionLogprobs:
    """The prompt's part of an echoed response's logprobs, as vLLM returns it: the first token
    has no logprob (null) and no alternatives (null); each other token its logprob under the
    model given the tokens before it, and the top alternatives."""
    result = _completion_logprobs(state, [e for e in entries if e is not None], 0)
    first = _token_text(state, prompt_ids[0])
    result.tokens.insert(0, first)
    result.token_logprobs.insert(0, None)
    result.top_logprobs.insert(0, None)
    result.text_offset = [0]
    for token in result.tokens[:-1]:
        result.text_offset.append(result.text_offset[-1] + len(token))
    return result


def _choice_logprobs(state, job, i: int, echo: str, want: bool) -> CompletionLogprobs | None:
    if not want:
        return None
    c = job.choices[i]
    completion = _completion_logprobs(state, c.logprobs, len(echo))
    if not echo:
        return completion
    prompt = _echo_logprobs(state, job.prompts[i], token_logprobs_of(c.prompt_logprobs,
                                                                     job.prompts[i]))
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        getattr(prompt, field).extend(getattr(completion, field))
    return prompt


@router.post("/v1/completions")
async def completions(request: Request):
    state, grant, body = await open_request(request, CompletionRequest)
    adapter = await resolve_model(state, grant, body.model)
    # max_tokens 0 with echo: the prompt's logprobs only (OpenAI's legacy scoring form); the
    # engine samples one token, which the answer leaves out.
    score_only = body.max_tokens == 0
    if score_only and (not body.echo or body.stream):
        raise ApiError(400, "max_tokens=0 scores the prompt only: it needs echo=true and "
                            "stream=false", param="max_tokens", code="invalid_value")
    prompts = body.prompts()
    prompt_ids = await asyncio.to_thread(lambda: [_encode_prompt(state, p) for p in prompts])
    max_tokens = [_check_lengths(state, ids, 1 if score_only else body.max_tokens, "prompt")
                  for ids in prompt_ids]
    want_logprobs = body.logprobs is not None
    # echo with logprobs: the prompt's tokens get theirs too (lm-eval's loglikelihood)
    prompt_logprobs = body.logprobs if body.echo and want_logprobs else None
    params, choice_prompts = [], []
    for ids, limit in zip(prompt_ids, max_tokens):
        params += _sampling_params(state, body, limit, want_logprobs, body.logprobs or 0,
                                   body.n, prompt_logprobs)
        choice_prompts += [ids] * body.n
    job = Job(state, "completions", adapter, prompt_ids[0], params, grant,
              prompts=choice_prompts)
    echoes = [""] * len(params)
    if body.echo:
        texts = await asyncio.to_thread(lambda: [
            p if isinstance(p, str) else state.tokenizer.decode(ids)
            for p, ids in zip(prompts, prompt_ids)])
        echoes = [t for t in texts for _ in range(body.n)]
    _log_request(state, job, body)
    job.admit()
    if body.stream:
        return JobStreamingResponse(_stream_completion(state, job, body, echoes), job)
    await collect_unless_disconnected(request, job)
    if score_only:
        for c in job.choices:
            c.text, c.token_ids, c.logprobs, c.finish_reason = "", [], [], "length"
    choices = [CompletionChoice(
        index=i, text=echoes[i] + c.text, finish_reason=c.finish_reason,
        logprobs=_choice_logprobs(state, job, i, echoes[i], want_logprobs))
        for i, c in enumerate(job.choices)]
    return CompletionResponse(id=job.id, model=body.model, choices=choices,
                              usage=job.usage()).model_dump()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state, grant, body = await open_request(request, ChatCompletionRequest)
    adapter = await resolve_model(state, grant, body.model)
    prompt_ids = await asyncio.to_thread(_encode_chat, state, body)
    requested = body.max_completion_tokens or body.max_tokens
    max_tokens = _check_lengths(state, prompt_ids, requested, "messages")
    job = Job(state, "chat", adapter, prompt_ids,
              _sampling_params(state, body, max_tokens, body.logprobs, body.top_logprobs or 0,
                               body.n), grant)
    _log_request(state, job, body)
    job.admit()
    if body.stream:
        return JobStreamingResponse(_stream_chat(state, job, body), job)
    await collect_unless_disconnected(request, job)
    top_n = body.top_logprobs or 0
    choices = [ChatCompletionChoice(
        index=i, message=ChatResponseMessage(content=c.text), finish_reason=c.finish_reason,
        logprobs=_chat_logprobs(state, c.logprobs, top_n) if body.logprobs else None)
        for i, c in enumerate(job.choices)]
    return ChatCompletionResponse(id=job.id, model=body.model, choices=choices,
                                  usage=job.usage()).model_dump()


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _stream_error(exc: Exception) -> str:
    """The error event that ends a stream whose 200 headers are already sent."""
    if not isinstance(exc, ApiError):
        log.exception("stream failed", exc_info=exc)
        exc = ApiError(500, f"internal error: {type(exc).__name__}", type_="server_error",
                       code="internal_error")
    return _sse(exc.body())


async def _stream_completion(state: ServerState, job: Job, body: CompletionRequest,
                             echoes: list[str]) -> AsyncIterator[str]:
    offsets = [len(echo) for echo in echoes]
    echo_logprobs = body.logprobs is not None and body.echo
    try:
        for i, echo in enumerate(echoes):
            if echo and not echo_logprobs:
                yield _sse(CompletionChunk(id=job.id, model=body.model,
                                           choices=[CompletionChoice(index=i, text=echo)]))
        async for index, out in job.events():
            if echo_logprobs and out.prompt_logprobs is not None:
                # the echoed prompt with its logprobs: they come with the first output
                prompt = _echo_logprobs(state, job.prompts[index],
                                        token_logprobs_of(out.prompt_logprobs,
                                                          job.prompts[index]))
                yield _sse(CompletionChunk(id=job.id, model=body.model, choices=[
                    CompletionChoice(index=index, text=echoes[index], logprobs=prompt)]))
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
    except Exception as exc:  # the client gets an error event, never a cut stream
        yield _stream_error(exc)
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
    except Exception as exc:  # the client gets an error event, never a cut stream
        yield _stream_error(exc)
    yield "data: [DONE]\n\n"
