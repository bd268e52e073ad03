"""The OpenAI-compatible HTTP server over the serving engine.

`create_app(engine, tokenizer, ServerConfig(...))` returns a FastAPI app; `lorafleet serve` runs
it with uvicorn. The `model` field of a request names the base model or an adapter (as in vLLM and
LoRAX). This file only assembles the app: the shared state and errors are in `state.py`, who may
do what in `access.py`, the routes in `generation.py` (completions, chat), `admin.py` (adapter
loading), `info.py` (health, metrics, model list), `adapter_info.py` (adapter tiers, inspect)
and `playground.py` (the browser UI at /ui and the stats it polls). Every error, ours or the
framework's, is answered in OpenAI's error shape.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException

from lorafleet.api import adapter_info, admin, generation, info, playground, tokens
from lorafleet.api.metrics import ServerMetrics
from lorafleet.api.state import ApiError, ServerConfig, ServerState
from lorafleet.serve import AsyncEngine, Engine

log = logging.getLogger(__name__)

__all__ = ["ServerConfig", "create_app"]


def create_app(engine: Engine | AsyncEngine, tokenizer, config: ServerConfig | None = None
               ) -> FastAPI:
    """engine: an `Engine` (wrapped in an `AsyncEngine` here) or an `AsyncEngine` (its `.engine`
    is the synchronous engine used for adapters and stats)."""
    config = config or ServerConfig()
    if isinstance(engine, AsyncEngine):
        async_engine, engine = engine, engine.engine
    else:
        async_engine = AsyncEngine(engine)
    config.fill_from(engine)
    if config.adapter_dir is not None and not any(
            Path(store.root).resolve() == Path(config.adapter_dir).resolve()
            for store in engine.stores):
        # Requests may name any adapter folder of the dir (resolved on demand, access.py).
        # (`lorafleet serve` attaches it before its --adapter registrations, which then win.)
        engine.register_store(config.adapter_dir, lazy=True)
    metrics = ServerMetrics(async_engine.stats, config.model_name)
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

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            error = ApiError(404, f"no route {request.method} {request.url.path}",
                             code="not_found")
        elif exc.status_code == 405:
            error = ApiError(405, f"method {request.method} not allowed on "
                                  f"{request.url.path}", code="method_not_allowed")
        else:
            error = ApiError(exc.status_code, str(exc.detail), code=str(exc.status_code))
        return error.response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        # A bug, never the client's fault: logged with its traceback, answered as JSON.
        log.exception("unhandled error on %s %s", request.method, request.url.path,
                      exc_info=exc)
        return ApiError(500, f"internal error: {type(exc).__name__}", type_="server_error",
                        code="internal_error").response()

    for module in (generation, admin, info, adapter_info, playground, tokens):
        app.include_router(module.router)
    return app
