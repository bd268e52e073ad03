"""vLLM's utility routes: POST /tokenize, POST /detokenize, GET /version.

    POST /tokenize   {"prompt": "text"} or {"messages": [...]}  -> {"count", "max_model_len",
                     "tokens"}                                  (the chat template applied)
    POST /detokenize {"tokens": [ids]}                          -> {"prompt": "text"}
    GET  /version                                               -> {"version": "0.1.0"}
    GET  /tokenizer_info        {"eos_token", "bos_token", "pad_token", "chat_template", ...}

lm-evaluation-harness's `local-completions` finds /tokenizer_info and /tokenize and then
tokenizes through the server (no local copy of the tokenizer needed).

Both POST routes take the caller's key like the generation routes (`model`, when given, must
be one the key may use); they never touch the engine.
"""
from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from lorafleet.api.access import authorize, open_request, resolve_model
from lorafleet.api.generation import check_token_ids
from lorafleet.api.protocol import ChatMessage
from lorafleet.api.state import ApiError, ServerState

router = APIRouter()


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


def _tokenize(state: ServerState, body: TokenizeRequest) -> list[int]:
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "send exactly one of \"prompt\" and \"messages\"", param="prompt")
    if body.prompt is not None:
        return list(state.tokenizer.encode(body.prompt,
                                           add_special_tokens=body.add_special_tokens))
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        return list(state.tokenizer.apply_chat_template(
            messages, add_generation_prompt=body.add_generation_prompt, tokenize=True))
    except Exception as exc:  # no template, or one that fails on these messages
        raise ApiError(400, f"messages cannot be rendered by the chat template: {exc}",
                       param="messages", code="chat_template_error") from exc


@router.post("/tokenize")
async def tokenize(request: Request):
    state, grant, body = await open_request(request, TokenizeRequest)
    if body.model is not None:
        await resolve_model(state, grant, body.model)
    tokens = await asyncio.to_thread(_tokenize, state, body)
    return {"count": len(tokens), "max_model_len": state.config.max_model_len,
            "tokens": tokens}


@router.post("/detokenize")
async def detokenize(request: Request):
    state, grant, body = await open_request(request, DetokenizeRequest)
    if body.model is not None:
        await resolve_model(state, grant, body.model)
    check_token_ids(state, body.tokens, "tokens")
    text = await asyncio.to_thread(state.tokenizer.decode, body.tokens)
    return {"prompt": text}


@router.get("/version")
async def version() -> dict[str, Any]:
    from lorafleet import __version__
    return {"version": __version__}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    state: ServerState = request.app.state.lorafleet
    authorize(request)
    tokenizer = state.tokenizer
    special = dict(getattr(tokenizer, "special_tokens", {}) or {})
    return {"tokenizer_class": type(tokenizer).__name__,
            "eos_token": special.get("eos_token"), "bos_token": special.get("bos_token"),
            "pad_token": special.get("pad_token"), "unk_token": special.get("unk_token"),
            "chat_template": getattr(tokenizer, "chat_template", None),
            "model_max_length": state.config.max_model_len}
