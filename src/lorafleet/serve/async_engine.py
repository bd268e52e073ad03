"""An asyncio face for the engine: a background thread runs `step()` while there is work, and
each request's outputs reach its `stream` through an asyncio queue.

    async for out in async_engine.stream("id", prompt_ids, "my-adapter", SamplingParams()):
        print(out.new_text, end="")

Calls that touch the engine from the event loop (`add_request`, `abort`) run in a worker thread,
because they wait for the engine's lock, which a step holds for its whole forward pass.
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
        self._thread = threading.Thread(target=self._loop, name="lorafleet-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopping:
            if not self.engine.has_work():
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug must not hang every client: fail what was running
                log.exception("engine step failed; failing the running requests")
                outputs = self._fail_running(f"engine step failed: {exc}")
            for out in outputs:
                self._deliver(out)

    def _fail_running(self, message: str) -> list[RequestOutput]:
        outputs = []
        with self.engine.lock:
            for seq in list(self.engine.scheduler.running):
                self.engine.scheduler.finish(seq, "error")
                seq.error = message
                outputs.append(self.engine._output(seq))
        return outputs

    def _deliver(self, out: RequestOutput) -> None:
        target = self._streams.get(out.request_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, out)

    async def stream(self, request_id: str, prompt_ids, adapter: str | None = None,
                     params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs until the finished one. Raises RequestError at
        once for a request the engine refuses. Leaving the loop early aborts the request."""
        if self._stopping:
            raise EngineError("the engine is shutting down")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        finished = False
        # The worker thread cannot be cancelled: if this stream is cancelled while it waits for
        # the engine's lock, add_request still runs later. Shielding keeps a handle on it so the
        # abort below runs only once the request is in (else it would abort nothing and the
        # request would run to the end with no reader).
        added = asyncio.ensure_future(asyncio.to_thread(
            self.engine.add_request, request_id, prompt_ids, adapter, params))
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
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join)

    def stats(self) -> dict:
        return self.engine.stats()


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
