"""The OpenAI HTTP shapes the server speaks: requests, responses, stream chunks, errors.

Field names and defaults follow the OpenAI API reference (and vLLM's `protocol.py` where the
reference leaves room). Requests are validated strictly: no bool where a number is expected
(`max_tokens: true` is refused, not read as 1), a range for every number. Unknown fields are
ignored, as vLLM does, so clients sending newer options still work; but fields we know and do
not implement (penalties, logit_bias, tools, ...) are accepted only at their neutral value, and
any other value is a 400 naming the field rather than being silently ignored.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

# OpenAI caps `n` at 128 and completions `logprobs` at 5; we keep the same ceilings so a client
# tested against us behaves the same against OpenAI.
MAX_N = 128
MAX_COMPLETION_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20
# OpenAI allows 4 stop sequences; vLLM has no cap. 64 serves every real use (lm-eval sends a
# handful) and bounds the per-token stop search.
MAX_STOP_SEQUENCES = 64
MAX_STOP_CHARS = 1024
# Prompts in one completions request (OpenAI's batch form): each is its own engine request.
MAX_PROMPTS = 256
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1   # OpenAI's and vLLM's range for `seed`
MAX_PATH_BYTES = 4096                          # PATH_MAX on Linux


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _is_neutral(field: str, value: Any, info: ValidationInfo) -> bool:
    """Whether `value` of an unimplemented field leaves the request's meaning unchanged."""
    if value is None:
        return True
    if field == "length_penalty":
        return not isinstance(value, bool) and value == 1
    if field in ("tools", "functions", "suffix"):
        return value in ({}, [], "")
    if field == "use_beam_search":
        return value is False
    if field in ("tool_choice", "function_call"):
        return value in ("none", "auto")
    if field == "best_of":
        return not isinstance(value, bool) and value in (1, info.data.get("n", 1))
    if field == "modalities":
        return value == ["text"]
    return False


def neutral_only(value: Any, info: ValidationInfo) -> Any:
    """The validator of an unimplemented field: its neutral value passes, any other is refused
    with a message naming the field."""
    if not _is_neutral(info.field_name, value, info):
        if info.field_name in ("tools", "tool_choice", "functions", "function_call"):
            raise ValueError(f"{info.field_name}: tool calling is not supported by this server "
                             f"yet (send the request without tools)")
        raise ValueError(f"{info.field_name}={str(value)[:64]} is not supported by this server "
                         f"(only its neutral value is accepted)")
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    user: str | None = None
    stream_options: StreamOptions | None = None
    # Extensions vLLM also accepts: generate exactly max_tokens (benchmarks), top-k sampling
    # (-1 or 0: no limit; a k above the vocabulary is no limit either).
    ignore_eos: bool = False
    top_k: int = Field(default=0, ge=-1, le=INT64_MAX)
    # Penalties and filters (OpenAI's and vLLM's meanings; models/sampling.py). None: the
    # model's generation_config.json value, else the neutral one.
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=100.0)
    logit_bias: dict[str, float] | None = None
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    min_tokens: int | None = Field(default=None, ge=0)
    stop_token_ids: list[int] | None = None
    # {"type": "text"} or {"type": "json_object"} (constrained decoding: the output parses)
    response_format: dict[str, Any] | None = None
    # Known, not implemented: only their neutral values are accepted (see _is_neutral).
    use_beam_search: Any = None
    length_penalty: float | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[int, float] | None:
        """OpenAI's form: token ids as JSON object keys (strings), biases in [-100, 100]."""
        if value is None:
            return None
        bias = {}
        for key, b in value.items():
            if not key.strip().isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key[:32]!r}")
            if not -100 <= b <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {b}")
            bias[int(key)] = float(b)
        return bias

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_token_ids(cls, value: list[int] | None) -> list[int] | None:
        if value and any(t < 0 for t in value):
            raise ValueError("stop_token_ids must be token ids (>= 0)")
        return value

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        kind = None if value is None else value.get("type")
        if value is not None and kind not in ("text", "json_object"):
            raise ValueError(f"response_format type {str(kind)[:32]!r} is not supported by this "
                             f"server: use \"text\" or \"json_object\"")
        return value

    @field_validator("use_beam_search", "length_penalty")
    @classmethod
    def _neutral_only(cls, value, info: ValidationInfo):
        return neutral_only(value, info)


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    # Completions `logprobs` is the number of alternatives per token (0..5); None = off.
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    # the OpenAI default for completions; 0 (with echo, not streamed) scores the prompt only
    max_tokens: int | None = Field(default=16, ge=0)
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        if isinstance(value, list) and not isinstance(value[0], int):
            # a batch: a list of strings or of token lists, each its own set of choices
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(value)}")
            if any(isinstance(p, list) and not p for p in value):
                raise ValueError("prompt must not contain an empty token list")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one, or the batch."""
        if isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], int):
            return list(self.prompt)
        return [self.prompt]

    @field_validator("best_of", "suffix")
    @classmethod
    def _completion_neutral_only(cls, value, info: ValidationInfo):
        return neutral_only(value, info)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are refused by the validator."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part["text"] for part in self.content)

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value):
        if isinstance(value, list):
            for part in value:
                if part.get("type") != "text":
                    raise ValueError(f"only text content parts are supported, got "
                                     f"{str(part.get('type'))[:64]!r}")
                if not isinstance(part.get("text"), str):
                    raise ValueError("a text content part needs \"text\": a string")
        return value


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    modalities: Any = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @field_validator("tools", "tool_choice", "functions", "function_call", "modalities")
    @classmethod
    def _chat_neutral_only(cls, value, info: ValidationInfo):
        return neutral_only(value, info)


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[dict[str, Any]] = []


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str = ""


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionChunk(BaseModel):
    """Streamed completions reuse the non-streaming shape, one token's text per choice."""
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "lorafleet"
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=MAX_PATH_BYTES)


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    lora_name: str = Field(min_length=1, max_length=256)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(message: str, type_: str, param: str | None = None,
               code: str | int | None = None) -> dict:
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param,
                                         code=code)).model_dump()
