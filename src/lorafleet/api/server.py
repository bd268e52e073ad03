"""The OpenAI-compatible HTTP server over the serving engine.

`create_app(engine, tokenizer, ServerConfig(...))` returns a FastAPI app; `lorafleet serve` runs
it with uvicorn. The `model` field of a request names the base model or an adapter (as in vLLM and
LoRAX). Generation endpoints live in `generation.py`; this file holds the app, the shared state,
errors, auth, the model list, run-time adapter loading, health and metrics.

Unloading an adapter that requests are using is refused with 409 naming those requests (rather
than waiting): the caller decides whether to retry, and a slow stream cannot stall an operator.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from lorafleet.api.auth import (OPEN, ApiKeys, BadPathError, Grant, PathOutsideError,
                                bearer_token, resolve_adapter_path)
from lorafleet.api.metrics import ServerMetrics
from lorafleet.api.protocol import (LoadLoraRequest, ModelCard, ModelList, UnloadLoraRequest,
                                    error_body)
from lorafleet.errors import EngineError, LoraFleetError

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    """model_name: the id clients use for the bare base model.
    max_model_len: prompt + generated tokens per sequence (default: the engine's).
    max_tokens_limit: the largest `max_tokens` a request may ask for (default: max_model_len).
    max_queue: sequences accepted and not yet finished (waiting + running); beyond it -> 429.
    adapter_dir: the only folder `/v1/load_lora_adapter` may load from (None: loading disabled).
    api_keys: None serves everyone; otherwise every request needs a key from it.
    """

    model_name: str = "base"
    max_model_len: int | None = None
    max_tokens_limit: int | None = None
    max_queue: int = 256
    adapter_dir: str | Path | None = None
    api_keys: ApiKeys | None = None
    vocab_size: int | None = None

    def __post_init__(self):
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"ServerConfig.max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_queue < 1:
            raise ValueError(f"ServerConfig.max_queue must be >= 1, got {self.max_queue}")

    def fill_from(self, engine: Any) -> None:
        """Take the limits the caller left open from the engine and its model."""
        if self.max_model_len is None:
            self.max_model_len = getattr(engine, "max_model_len", None) or 2048
        if self.max_tokens_limit is None:
            self.max_tokens_limit = self.max_model_len
        if self.vocab_size is None:
            model_config = getattr(getattr(engine, "model", None), "config", None)
            self.vocab_size = getattr(model_config, "vocab_size", None)


class ApiError(Exception):
    """An error answered in the OpenAI shape {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code),
                            status_code=self.status)


@dataclass
class ServerState:
    """What the routes share: the engine pair, tokenizer, config, metrics, and which requests
    use which adapter (to refuse unloading those)."""

    engine: Any
    async_engine: Any
    tokenizer: Any
    config: ServerConfig
    metrics: ServerMetrics
    outstanding: int = 0
    in_use: dict[str | None, set[str]] = field(default_factory=dict)
    unloading: set[str] = field(default_factory=set)
    draining: bool = False


async def parse_body(request: Request, model: type[BaseModel]) -> Any:
    """Parse and validate a JSON body; 400 naming the first bad field otherwise."""
    raw = await request.body()
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(payload).__name__}")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(400, f"{param}: {first['msg']}", param=param,
                       code="invalid_value") from exc


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


def resolve_model(state: ServerState, grant: Grant, model: str) -> str | None:
    """The adapter a `model` field names (None for the base); 404 unknown, 403 not granted."""
    if model == state.config.model_name:
        return None
    if model not in state.engine.adapters() or model in state.unloading:
        raise ApiError(404, f"model {model!r} does not exist: use {state.config.model_name!r} "
                            f"or an adapter listed by GET /v1/models", param="model",
                       code="model_not_found")
    if not grant.allows(model):
        raise ApiError(403, f"this API key may not use model {model!r}",
                       type_="permission_error", param="model", code="model_not_allowed")
    return model


def create_app(engine: Any, tokenizer: Any, config: ServerConfig | None = None) -> FastAPI:
    """engine: an `Engine` (wrapped in an `AsyncEngine` here) or an `AsyncEngine` (its `.engine`
    is the synchronous engine used for adapters and stats)."""
    config = config or ServerConfig()
    if hasattr(engine, "stream"):
        async_engine, engine = engine, engine.engine
    else:
        from lorafleet.serve import AsyncEngine
        async_engine = AsyncEngine(engine)
    config.fill_from(engine)
    metrics = ServerMetrics(engine.stats)
    state = ServerState(engine, async_engine, tokenizer, config, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # uvicorn has already waited for open connections (SIGTERM drains in-flight requests);
        # let the engine finish whatever is left, then stop its thread.
        state.draining = True
        log.info("shutting down: connections closed, draining the engine")
        await async_engine.shutdown(drain=True)
        log.info("engine stopped")

    app = FastAPI(title="lorafleet", lifespan=lifespan)
    app.state.lorafleet = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        state.metrics.rejected.labels(reason=str(exc.code or exc.status)).inc()
        return exc.response()

    @app.exception_handler(404)
    async def _not_found(request: Request, exc):
        return ApiError(404, f"no route {request.method} {request.url.path}",
                        code="not_found").response()

    @app.exception_handler(405)
    async def _not_allowed(request: Request, exc):
        return ApiError(405, f"method {request.method} not allowed on {request.url.path}",
                        code="method_not_allowed").response()

    @app.get("/health")
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_route():
        # engine.stats() waits for the engine's lock (held through a step): off the loop.
        body = await asyncio.to_thread(state.metrics.render)
        return Response(body, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(request: Request):
        grant = authorize(request)
        cards = [ModelCard(id=config.model_name, root=config.model_name)]
        for name in sorted(engine.adapters()):
            if grant.allows(name):
                cards.append(ModelCard(id=name, root=name, parent=config.model_name))
        return ModelList(data=cards).model_dump()

    def require_admin(request: Request, verb: str) -> None:
        if not authorize(request).is_admin:
            raise ApiError(403, f"only keys granted \"*\" may {verb} adapters",
                           type_="permission_error", code="not_admin")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        require_admin(request, "load")
        body = await parse_body(request, LoadLoraRequest)
        if config.adapter_dir is None:
            raise ApiError(403, "run-time adapter loading is disabled: start the server with "
                                "--adapter-dir DIR", type_="permission_error",
                           param="lora_path", code="loading_disabled")
        name = body.lora_name
        if name == config.model_name or name in engine.adapters():
            raise ApiError(400, f"model {name!r} is already loaded; unload it first",
                           param="lora_name", code="already_loaded")
        try:
            path = resolve_adapter_path(config.adapter_dir, body.lora_path)
        except BadPathError as exc:
            raise ApiError(400, str(exc), param="lora_path", code="invalid_path") from exc
        except PathOutsideError as exc:
            raise ApiError(403, str(exc), type_="permission_error", param="lora_path",
                           code="path_outside_adapter_dir") from exc
        if not path.is_dir():
            raise ApiError(404, f"adapter folder {body.lora_path!r} does not exist in the "
                                f"adapter directory", param="lora_path", code="adapter_not_found")
        try:
            # Reading the files is blocking I/O: keep it off the event loop.
            await asyncio.to_thread(engine.register_adapter, name, str(path))
        except LoraFleetError as exc:
            log.warning("adapter %s from %s failed to load: %s", name, path, exc)
            raise ApiError(400, f"adapter {name!r} failed to load: {exc}", param="lora_path",
                           code="adapter_load_failed") from exc
        except Exception as exc:  # a broken file must never take the server down
            log.exception("adapter %s from %s failed to load", name, path)
            raise ApiError(400, f"adapter {name!r} failed to load: {type(exc).__name__}: {exc}",
                           param="lora_path", code="adapter_load_failed") from exc
        log.info("loaded adapter %s from %s", name, path)
        return {"status": "ok", "lora_name": name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        require_admin(request, "unload")
        body = await parse_body(request, UnloadLoraRequest)
        name = body.lora_name
        if name not in engine.adapters():
            raise ApiError(404, f"adapter {name!r} is not loaded", param="lora_name",
                           code="model_not_found")
        users = sorted(state.in_use.get(name, ()))
        if users:
            raise ApiError(409, f"adapter {name!r} is in use by {len(users)} request(s): "
                                f"{', '.join(users[:10])}; retry when they finish",
                           param="lora_name", code="adapter_in_use")
        # From here new requests see the adapter as gone, so none can slip in while the
        # engine unregisters it in a worker thread.
        state.unloading.add(name)
        try:
            await asyncio.to_thread(engine.unregister_adapter, name)
        except EngineError as exc:
            raise ApiError(409, f"adapter {name!r} cannot be unloaded: {exc}",
                           param="lora_name", code="adapter_in_use") from exc
        finally:
            state.unloading.discard(name)
        log.info("unloaded adapter %s", name)
        return {"status": "ok", "lora_name": name}

    from lorafleet.api.generation import add_generation_routes
    add_generation_routes(app, state)
    return app
