"""Reading a request body, totally: every malformed body is a 4xx in OpenAI's error shape, never
a 500 or a dropped connection.

In order: Content-Type must be JSON (415; a form or text/plain POST from a web page, which needs
no CORS preflight, is refused), the body at most `max_body_bytes` (413), valid UTF-8 JSON, an
object, nested at most `max_json_depth` deep, no lone surrogates in any string (they cannot be
encoded, tokenized or written to a metrics label), then the pydantic model (strict types).
"""
from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError

from lorafleet.api.state import ApiError, ServerConfig

JSON_MEDIA_TYPES = ("application/json",)


def check_content_type(request: Request) -> None:
    header = request.headers.get("content-type", "")
    media_type = header.split(";", 1)[0].strip().lower()
    if media_type not in JSON_MEDIA_TYPES and not media_type.endswith("+json"):
        raise ApiError(415, f"Content-Type must be application/json, got {header!r}",
                       code="unsupported_media_type")


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit}",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def check_json_tree(payload: Any, max_depth: int) -> None:
    """Depth and string checks over the parsed body, iteratively (no recursion to overflow)."""
    stack = [(payload, 1, "")]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > max_depth:
                raise ApiError(400, f"request body is nested more than {max_depth} levels deep",
                               param=where or None, code="too_deep")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_string(key, where)
                stack.append((item, depth + 1, f"{where}.{key}" if where else str(key)))
        elif isinstance(value, str):
            _check_string(value, where)


def _check_string(value: str, where: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{where or 'body'}: a string holds a lone UTF-16 surrogate "
                            f"(not valid Unicode)", param=where or None,
                       code="invalid_unicode") from exc


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _is_union_tag(part) -> bool:
    """pydantic names the member of a union that failed (`str`, `list[int]`, ...) in an
    error's location; the client's field path is the rest."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "dict", "list",
                                               "none"} or "[" in part or part.startswith(
                                                   ("function-", "nullable", "json-or-python")))


def validation_error(exc: ValidationError) -> ApiError:
    """400 naming the first bad field."""
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"] if not _is_union_tag(part)) or None
    message = first["msg"].removeprefix("Value error, ")
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


async def parse_body(request: Request, model: type[BaseModel]) -> Any:
    """Parse and validate a JSON body into `model`; a 4xx naming the problem otherwise."""
    config: ServerConfig = request.app.state.lorafleet.config
    check_content_type(request)
    raw = await read_limited(request, config.max_body_bytes)
    try:
        payload = json.loads(raw, parse_constant=_no_constant)
    # ValueError: JSONDecodeError, UnicodeDecodeError, NaN/Infinity, an integer of more digits
    # than Python converts
    except ValueError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError as exc:  # deeper than the parser's own stack
        raise ApiError(400, f"request body is nested more than {config.max_json_depth} levels "
                            f"deep", code="too_deep") from exc
    if not isinstance(payload, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(payload).__name__}",
                       code="invalid_json")
    check_json_tree(payload, config.max_json_depth)
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise validation_error(exc) from exc
