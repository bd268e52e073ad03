"""Read-only routes: GET /health (for a supervisor), /metrics (Prometheus), /v1/models.

/health is 503 while draining and when the engine is not healthy (its step thread died, or its
last step failed), so a supervisor restarts the server instead of sending it more traffic.
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from lorafleet.api.access import authorize, visible_models
from lorafleet.api.protocol import ModelCard, ModelList
from lorafleet.api.state import ServerState

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    state: ServerState = request.app.state.lorafleet
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    problem = state.async_engine.health_problem()
    if problem is not None:
        return JSONResponse({"status": "unhealthy", "reason": problem}, status_code=503)
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(request: Request):
    state: ServerState = request.app.state.lorafleet
    # engine.stats() waits for the engine's lock (held through a step): off the loop.
    body = await asyncio.to_thread(state.metrics.render)
    return Response(body, media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def list_models(request: Request):
    state: ServerState = request.app.state.lorafleet
    grant = authorize(request)
    name = state.config.model_name
    cards = [ModelCard(id=name, root=name)]
    for adapter in await asyncio.to_thread(visible_models, state, grant):
        cards.append(ModelCard(id=adapter, root=adapter, parent=name))
    return ModelList(data=cards).model_dump()
