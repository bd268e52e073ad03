"""Adapters added and removed at run time: vLLM's POST /v1/load_lora_adapter and
/v1/unload_lora_adapter, for keys granted "*".

The name follows the store's rule and is never the served model's name; the folder and each of
its files must resolve inside --adapter-dir. Loads and unloads of one name are serialized: while
one is in progress a second gets 409, a second load of a loaded name 409, an unload of a name
not (or no longer) loaded 404. Unloading an adapter that requests are using is refused with 409
naming those requests (rather than waiting): the caller decides whether to retry, and a slow
stream cannot stall an operator.
"""
from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request

from lorafleet.api.access import check_adapter_name, check_adapter_size, require_admin
from lorafleet.api.auth import BadPathError, PathOutsideError, confine_folder_files, \
    resolve_adapter_path
from lorafleet.api.body import parse_body
from lorafleet.api.protocol import LoadLoraRequest, UnloadLoraRequest
from lorafleet.api.state import ApiError, ServerState
from lorafleet.errors import EngineError, LoraFleetError

log = logging.getLogger(__name__)

router = APIRouter()


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request):
    state: ServerState = request.app.state.lorafleet
    config, engine = state.config, state.engine
    require_admin(request, "load")
    body = await parse_body(request, LoadLoraRequest)
    if config.adapter_dir is None:
        raise ApiError(403, "run-time adapter loading is disabled: start the server with "
                            "--adapter-dir DIR", type_="permission_error",
                       param="lora_path", code="loading_disabled")
    name = check_adapter_name(body.lora_name, config)
    if name in state.loading or name in state.unloading:
        raise ApiError(409, f"adapter {name!r} is being loaded or unloaded by another request",
                       param="lora_name", code="adapter_busy")
    if engine.has_adapter(name):
        raise ApiError(409, f"model {name!r} is already loaded; unload it first",
                       param="lora_name", code="already_loaded")
    try:
        path = resolve_adapter_path(config.adapter_dir, body.lora_path)
        if path.is_dir():
            check_adapter_size(config, name, confine_folder_files(config.adapter_dir, path),
                               "lora_path")
    except BadPathError as exc:
        raise ApiError(400, str(exc), param="lora_path", code="invalid_path") from exc
    except PathOutsideError as exc:
        raise ApiError(403, str(exc), type_="permission_error", param="lora_path",
                       code="path_outside_adapter_dir") from exc
    if not path.is_dir():
        raise ApiError(404, f"adapter folder {body.lora_path!r} does not exist in the "
                            f"adapter directory", param="lora_path", code="adapter_not_found")
    state.loading.add(name)
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
    finally:
        state.loading.discard(name)
    log.info("loaded adapter %s from %s", name, path)
    return {"status": "ok", "lora_name": name}


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request):
    state: ServerState = request.app.state.lorafleet
    require_admin(request, "unload")
    body = await parse_body(request, UnloadLoraRequest)
    name = body.lora_name
    if name in state.loading:
        raise ApiError(409, f"adapter {name!r} is being loaded by another request",
                       param="lora_name", code="adapter_busy")
    if not state.engine.has_adapter(name) or name in state.unloading:
        raise ApiError(404, f"adapter {name[:128]!r} is not loaded", param="lora_name",
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
        await asyncio.to_thread(state.engine.unregister_adapter, name)
    except EngineError as exc:
        raise ApiError(409, f"adapter {name!r} cannot be unloaded: {exc}",
                       param="lora_name", code="adapter_in_use") from exc
    finally:
        state.unloading.discard(name)
    log.info("unloaded adapter %s", name)
    return {"status": "ok", "lora_name": name}
