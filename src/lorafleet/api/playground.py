"""The browser playground: GET /ui (static HTML, CSS and JS shipped in the package, no build step
and nothing fetched from elsewhere: the machines that serve may be offline) and GET /v1/stats,
the engine's counters (and the caller's own quota) as JSON, which the live dashboard polls.

The static files hold no data and no secret, so they are served without a key (a browser cannot
attach an Authorization header to a page load). Everything the page shows comes from the API,
with the key the user types: the page keeps it in sessionStorage (gone when the tab closes) and
sends it as `Authorization: Bearer`, never as a cookie, so another site cannot make the browser
use it (no CSRF) and the API's auth stays the one rule. The Content-Security-Policy allows only
this origin's scripts and connections: an injected script could read the key, so the page
writes every server-provided string with textContent and the policy forbids inline scripts.
"""
from __future__ import annotations

import asyncio
import time
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from lorafleet.api.access import authorize
from lorafleet.api.auth import Grant
from lorafleet.api.quota import Quotas
from lorafleet.api.state import ApiError, ServerState

router = APIRouter()

STATIC_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; form-action 'none'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # A page from an older server must not outlive an upgrade in the browser's cache.
    "Cache-Control": "no-cache",
}


def _static_files() -> dict[str, bytes]:
    """The shipped files by name, read once: a fixed set, so no request path reaches the file
    system."""
    folder = resources.files("lorafleet.api") / "ui"
    return {entry.name: entry.read_bytes() for entry in folder.iterdir()
            if entry.is_file() and entry.name[entry.name.rfind("."):] in STATIC_TYPES}


FILES = _static_files()


@router.get("/ui", include_in_schema=False)
async def ui_root():
    return RedirectResponse("/ui/", status_code=308)


@router.get("/ui/{name}", include_in_schema=False)
@router.get("/ui/", include_in_schema=False)
async def ui_file(name: str = "index.html"):
    body = FILES.get(name)
    if body is None:
        raise ApiError(404, f"no file {name[:64]!r} in the playground", code="not_found")
    return Response(body, media_type=STATIC_TYPES[name[name.rfind("."):]],
                    headers=SECURITY_HEADERS)


def key_usage(quotas: Quotas, grant: Grant) -> dict:
    """The caller's own limits (quota.py) and how much of them it is using now; None = no
    limit. Read only: the bucket's refill is computed, not applied."""
    usage = {"key_id": grant.key_id, "max_concurrent": grant.max_concurrent,
             "in_flight": quotas.in_flight.get(grant.key_id, 0) if grant.key_id else 0,
             "tokens_per_minute": grant.tokens_per_minute, "tokens_available": None}
    if grant.tokens_per_minute is not None:
        bucket = quotas.buckets.get(grant.key_id)
        usage["tokens_available"] = (float(grant.tokens_per_minute) if bucket is None  # unused
                                     else bucket.available(quotas.clock()))
    return usage


def engine_stats(state: ServerState, grant: Grant) -> dict:
    return {"object": "stats", "time": time.time(),
            "model": state.config.model_name,
            "server": {"outstanding": state.outstanding, "draining": state.draining,
                       "max_queue": state.config.max_queue},
            "key": key_usage(state.quotas, grant),
            # Whatever the engine reports, as it reports it: the page charts the keys it
            # knows and lists every one.
            "engine": state.engine.stats()}


@router.get("/v1/stats")
async def stats(request: Request):
    state: ServerState = request.app.state.lorafleet
    grant = authorize(request)
    # engine.stats() waits for the engine's lock (held through a step): off the loop.
    return await asyncio.to_thread(engine_stats, state, grant)
