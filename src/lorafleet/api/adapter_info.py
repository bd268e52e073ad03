"""What a key may know about its adapters: GET /v1/adapters (each visible adapter with its rank,
targets, pool size, tier and last use) and GET /v1/adapters/{name} (the `lorafleet adapters
inspect` view of its folder, as JSON).

The list holds exactly the adapters GET /v1/models lists for the same key (`visible_models`); an
adapter the key may not use is a 404, the same as one that does not exist (access.py: no
existence leak). Tiers follow the engine's (S-LoRA sec. 5.2): "pool" (resident in pool pages),
"host" (a page copy in host memory, written into the pool without a read), "disk" (read from its
folder when a request needs it). A folder of --adapter-dir that no request has named yet is
"disk" and unregistered: its rank and targets are not known until it is read (`inspect` reads
its config and header).
"""
from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Request

from lorafleet.api.access import adapter_folder, authorize, model_not_found, visible_models
from lorafleet.api.state import ApiError, ServerState
from lorafleet.errors import LoraFleetError
from lorafleet.lora.peft_format import inspect_adapter

router = APIRouter()


def adapter_rows(state: ServerState, names: list[str]) -> list[dict]:
    """One row per name, read under the engine's lock (the engine thread changes tiers)."""
    engine = state.engine
    page_bytes = engine.memory_stats().get("page_bytes")
    rows = []
    with engine.lock:
        cache = engine.cache
        for name in names:
            spec = cache.specs.get(name)
            row = {"id": name, "registered": spec is not None, "tier": "disk",
                   "loading": name in cache.loading, "rank": None, "ranks": [],
                   "targets": [], "modules": 0, "pages": None, "size_bytes": None,
                   "in_use": len(state.in_use.get(name, ())),
                   "last_used": state.last_used.get(name)}
            if spec is not None:
                if name in cache.resident:
                    row["tier"] = "pool"
                elif cache.ready(name):
                    row["tier"] = "host"
                row.update(rank=spec.max_rank, ranks=sorted(set(spec.ranks)),
                           targets=sorted({m.rsplit(".", 1)[-1] for m in spec.module_names}),
                           modules=len(spec.module_names), pages=spec.num_pages,
                           size_bytes=None if page_bytes is None
                           else spec.num_pages * page_bytes)
            rows.append(row)
    return rows


@router.get("/v1/adapters")
async def list_adapters(request: Request):
    state: ServerState = request.app.state.lorafleet
    grant = authorize(request)
    names = await asyncio.to_thread(visible_models, state, grant)
    rows = await asyncio.to_thread(adapter_rows, state, names)
    return {"object": "list", "data": rows, "can_manage": grant.is_admin,
            "loading_enabled": state.config.adapter_dir is not None}


def _folder(state: ServerState, name: str) -> Path | None:
    with state.engine.lock:
        spec = state.engine.cache.specs.get(name)
    if spec is not None:
        return None if spec.path is None else Path(spec.path)
    return adapter_folder(state.config, name)


def _inspect(state: ServerState, name: str) -> dict | None:
    folder = _folder(state, name)
    if folder is None:
        return None
    try:
        info = inspect_adapter(folder)
    # OSError: the folder changed on disk since it was registered (removed, unreadable).
    except (LoraFleetError, OSError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ApiError(400, f"adapter {name!r} cannot be inspected: "
                            f"{reason.replace(str(folder), folder.name)}", param="name",
                       code="adapter_unreadable") from exc
    # The folder's name only: the server's file layout is not the client's business.
    info["path"] = folder.name
    return info


@router.get("/v1/adapters/{name}")
async def inspect(request: Request, name: str):
    state: ServerState = request.app.state.lorafleet
    grant = authorize(request)
    if name not in await asyncio.to_thread(visible_models, state, grant):
        raise model_not_found(state, name)
    info = await asyncio.to_thread(_inspect, state, name)
    if info is None:
        raise ApiError(404, f"adapter {name!r} was registered from tensors in memory: it has "
                            f"no folder to inspect", param="name", code="no_folder")
    return {"id": name, "object": "adapter", **info}
