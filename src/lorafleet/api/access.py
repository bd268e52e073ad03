"""Who is calling and what they may use: the caller's grant from its key, admin checks, and the
adapter a request's `model` names (registered, or resolved on demand from --adapter-dir).

No existence leak: a restricted key gets the same 404 for an adapter it may not use as for one
that does not exist, and its grant is checked before anything is resolved, so a key can never
cause the load (or the eviction that a load may bring) of an adapter it may not use.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import Request

from lorafleet.adapters.store import check_name
from lorafleet.api.auth import (OPEN, ApiKeys, BadPathError, Grant, PathOutsideError,
                                bearer_token, confine_folder_files, resolve_adapter_path)
from lorafleet.api.body import parse_body
from lorafleet.api.metrics import BASE_LABEL
from lorafleet.api.state import ApiError, ServerConfig, ServerState
from lorafleet.errors import AdapterError, LoraFleetError

log = logging.getLogger(__name__)

# Labels the server itself uses: an adapter of that name would be confused with them.
RESERVED_NAMES = frozenset({BASE_LABEL})


def authorize(request: Request) -> Grant:
    """The caller's grant: 401 for a missing or unknown key when keys are configured."""
    keys: ApiKeys | None = request.app.state.lorafleet.config.api_keys
    if keys is None:
        return OPEN
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'",
                       type_="authentication_error", code="missing_api_key")
    grant = keys.lookup(token)
    if grant is None:
        raise ApiError(401, "invalid API key", type_="authentication_error",
                       code="invalid_api_key")
    return grant


async def open_request(request: Request, body_type: type) -> tuple[ServerState, Grant, Any]:
    """The opening of every generation and token route: the server state, the caller's grant
    (a bad key is a 401 before the body is read), the checked body."""
    state: ServerState = request.app.state.lorafleet
    grant = authorize(request)
    return state, grant, await parse_body(request, body_type)


def require_admin(request: Request, verb: str) -> Grant:
    grant = authorize(request)
    if not grant.is_admin:
        raise ApiError(403, f"only keys granted \"*\" may {verb} adapters",
                       type_="permission_error", code="not_admin")
    return grant


def check_adapter_name(name: str, config: ServerConfig, param: str = "lora_name") -> str:
    """The store's name rule, and never the served model's name or a reserved label."""
    try:
        check_name(name)
    except AdapterError as exc:
        raise ApiError(400, str(exc), param=param, code="invalid_name") from exc
    if name == config.model_name or name in RESERVED_NAMES:
        raise ApiError(400, f"adapter name {name!r} is reserved (the served model's name or a "
                            f"label the server uses)", param=param, code="invalid_name")
    return name


def model_not_found(state: ServerState, model: str) -> ApiError:
    shown = model if len(model) <= 128 else model[:128] + "..."
    return ApiError(404, f"model {shown!r} does not exist: use {state.config.model_name!r} "
                         f"or a model listed by GET /v1/models", param="model",
                    code="model_not_found")


def adapter_folder(config: ServerConfig, name: str):
    """The folder of adapter `name` in --adapter-dir with every file inside the dir, or None
    when there is no such folder (or it would reach outside)."""
    if config.adapter_dir is None:
        return None
    try:
        path = resolve_adapter_path(config.adapter_dir, name)
        if not path.is_dir():
            return None
        size = confine_folder_files(config.adapter_dir, path)
    except (BadPathError, PathOutsideError) as exc:
        # info, not warning: any client can name such a folder, as often as it likes
        log.info("adapter %r not resolved: %s", name, exc)
        return None
    check_adapter_size(config, name, size, "model")
    return path


def check_adapter_size(config: ServerConfig, name: str, size: int, param: str) -> None:
    if size > config.max_adapter_bytes:
        raise ApiError(413, f"adapter {name!r} is {size} bytes, more than the server's limit "
                            f"of {config.max_adapter_bytes}", param=param,
                       code="adapter_too_large")


async def resolve_model(state: ServerState, grant: Grant, model: str) -> str | None:
    """The adapter a `model` field names (None for the base); 404 when the key may not see it
    or it exists neither registered nor as a folder of --adapter-dir."""
    if model == state.config.model_name:
        return None
    if not grant.allows(model) or model in state.unloading or model in state.loading:
        raise model_not_found(state, model)
    engine = state.engine
    if engine.has_adapter(model):
        return model
    try:
        check_name(model)
    except AdapterError:
        raise model_not_found(state, model) from None
    if model in RESERVED_NAMES:
        raise model_not_found(state, model)
    try:
        # Checks the folder's files, reads its config and header: blocking I/O, off the loop.
        found = await asyncio.to_thread(_resolve_from_dir, state, model)
    except LoraFleetError as exc:
        log.warning("adapter %s could not be resolved: %s", model, exc)
        raise ApiError(400, f"adapter {model!r} failed to load: {exc}", param="model",
                       code="adapter_load_failed") from exc
    if not found:
        raise model_not_found(state, model)
    log.info("resolved adapter %s on demand", model)
    return model


def _resolve_from_dir(state: ServerState, name: str) -> bool:
    """Register folder `name` of --adapter-dir (header only) if it is there and confined."""
    if adapter_folder(state.config, name) is None:
        return False
    return state.engine.resolve_adapter(name)


def visible_models(state: ServerState, grant: Grant) -> list[str]:
    """Adapters this key may use: registered or resolvable from --adapter-dir, nothing else.
    Reads the folder: call it off the event loop."""
    names = set(state.engine.resolvable_adapters()) - state.unloading
    registered = set(state.engine.adapters())
    # A folder is listed only if a request for it would be served: its name follows the rule
    # and its files stay inside the dir.
    return sorted(n for n in names if grant.allows(n) and n != state.config.model_name
                  and n not in RESERVED_NAMES and _valid_name(n)
                  and (n in registered or _servable_folder(state.config, n)))


def _servable_folder(config: ServerConfig, name: str) -> bool:
    try:
        return adapter_folder(config, name) is not None
    except ApiError:      # too large: a request for it would be refused
        return False


def _valid_name(name: str) -> bool:
    try:
        check_name(name)
    except AdapterError:
        return False
    return True
