"""An asyncio face for the engine: a background thread runs `step()` while there is work, and
each request's outputs reach its `stream` through an asyncio queue.

    async for out in async_engine.stream("id", prompt_ids, "my-adapter", SamplingParams()):
        print(out.new_text, end="")

Calls that touch the engine from the event loop (`add_request`, `abort`) run in a worker thread,
because they wait for the engine's lock, which a step holds for its whole forward pass.

The thread is watched: a step that raises fails the requests it was running (their state is
unknown) and is counted (`failed_steps`); if the thread itself dies, every waiting stream is
woken with an error and `health_problem()` says why, so a server can answer 503 and be
restarted instead of hanging its clients.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import AsyncIterator

from lorafleet.errors import EngineError

from .engine import Engine, RequestOutput, SamplingParams

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05   # how long the thread sleeps when idle before looking again


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self.failed_steps = 0
        self.last_step_failed = False
        self.dead: str | None = None      # why the step thread stopped unexpectedly
        self._thread = threading.Thread(target=self._run, name="lorafleet-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the thread is dying: nobody would wake the waiters
            self.dead = f"the engine thread stopped: {type(exc).__name__}: {exc}"
            log.critical("%s", self.dead, exc_info=True)
            self._fail_streams(self.dead)
            if not isinstance(exc, Exception):   # SystemExit, KeyboardInterrupt: pass it on
                raise

    def _loop(self) -> None:
        while not self._stopping:
            if not self.engine.has_work():
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
                self.last_step_failed = False
            except Exception as exc:  # a bug must not hang every client: fail what was running
                log.exception("engine step failed; failing the running requests")
                self.failed_steps += 1
                self.last_step_failed = True
                outputs = self.engine.fail_running(f"engine step failed: {exc}")
            for out in outputs:
                self._deliver(out)

    def _fail_streams(self, message: str) -> None:
        for request_id in list(self._streams):
            self._deliver(RequestOutput(request_id, [], "", True, "error", None, 0, 0,
                                        error=message))

    def health_problem(self) -> str | None:
        """None when the engine is serving; else what is wrong (for /health)."""
        if self.dead is not None:
            return self.dead
        if not self._thread.is_alive() and not self._stopping:
            return "the engine thread is not running"
        parallel = getattr(self.engine, "parallel", None)
        if parallel is not None and not parallel.healthy():      # a tensor-parallel worker died
            return parallel.failure()
        if self.last_step_failed:
            return f"the last engine step failed ({self.failed_steps} failed steps so far)"
        return None

    def _deliver(self, out: RequestOutput) -> None:
        target = self._streams.get(out.request_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, out)

    async def stream(self, request_id: str, prompt_ids, adapter: str | None = None,
                     params: SamplingParams | None = None,
                     tenant: str | None = None) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs until the finished one. Raises RequestError at
        once for a request the engine refuses. Leaving the loop early aborts the request.
        `tenant` (who sent it) lets the engine share admission fairly between senders."""
        if self._stopping:
            raise EngineError("the engine is shutting down")
        if self.dead is not None:
            raise EngineError(self.dead)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        finished = False
        # The worker thread cannot be cancelled: if this stream is cancelled while it waits for
        # the engine's lock, add_request still runs later. Shielding keeps a handle on it so the
        # abort below runs only once the request is in (else it would abort nothing and the
        # request would run to the end with no reader).
        added = asyncio.ensure_future(asyncio.to_thread(
            self.engine.add_request, request_id, prompt_ids, adapter, params, tenant))
        try:
            await asyncio.shield(added)
            self._wake.set()
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                await _settled(added)
                if not added.cancelled() and added.exception() is None:
                    await asyncio.to_thread(self.engine.abort, request_id)

    async def abort(self, request_id: str) -> bool:
        return await asyncio.to_thread(self.engine.abort, request_id)

    async def shutdown(self, drain: bool = True) -> None:
        """Stop the thread; with drain, after every queued and running request has finished,
        otherwise after aborting them."""
        if not drain:
            with self.engine.lock:
                ids = list(self.engine.requests)
            for request_id in ids:
                await self.abort(request_id)
        while self.engine.has_work() and self._thread.is_alive():
            await asyncio.sleep(IDLE_WAIT_S)
        self._fail_streams("the engine stopped")  # none left after a drain; else wake them
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join)

    def stats(self) -> dict:
        return {**self.engine.stats(), "failed_steps": self.failed_steps,
                "engine_healthy": self.health_problem() is None}


async def _settled(future: asyncio.Future) -> None:
    """Wait until `future` is done, even if the waiting task is cancelled again meanwhile
    (the cancellation is re-raised once the future has settled)."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
