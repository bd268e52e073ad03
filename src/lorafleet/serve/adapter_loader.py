"""The host side of adapters: a loader thread that reads adapters from disk while steps run, and
the host tier that holds their page copies.

Tiers (S-LoRA sec. 5.2 keeps every adapter in host memory; vLLM's `--max-cpu-loras` and LoRAX
add a disk tier, which is what lets the registry grow past memory):

    disk (safetensors, memory-mapped)  ->  host cache (LRU, optional)  ->  pool (adapter_cache.py)

The loader only reads, checks (finite floats, shapes as registered) and converts to page form
on the host: the pool is not thread-safe, so pages are allocated and written on the engine
thread, from the copy the loader delivered. A copy delivered but not yet in the pool is
"staged"; staged copies are bounded by count (`max_staged`), the cache by `max_count` (vLLM's
`max_cpu_loras`) and optionally by bytes. With no cache (the default) a copy lives only until it
is written into the pool, so host memory holds at most `max_staged` adapters, whatever the number
registered. Whether the cache earns its copy on CPU is measured in docs/engine.md.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lorafleet.adapters.store import confine
from lorafleet.errors import LoraFleetError

from .adapter_registry import AdapterSpec, file_pages

log = logging.getLogger(__name__)


@dataclass
class LoadResult:
    name: str
    version: int          # the registration it was read for (AdapterSpec.version)
    pages: torch.Tensor | None
    error: str | None
    seconds: float        # read + check + convert, on the loader thread


class AdapterLoader:
    """One background thread: `submit(spec)` queues a read; `completed()` (engine thread) takes
    what has finished. `read(spec, folder, dtype) -> pages` is `file_pages`; tests replace it to
    make reads slow or fail."""

    def __init__(self, dtype: torch.dtype, threaded: bool = True,
                 stage: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """threaded=False reads in the caller's thread at `submit` (deterministic scheduling for
        tests and debugging; every load then stalls the step that asks for it). stage: applied
        to the pages read, on this thread (page_copy.py: pins them for a CUDA pool)."""
        self.dtype, self.threaded = dtype, threaded
        self.read: Callable[[AdapterSpec, Path, torch.dtype], torch.Tensor] = file_pages
        self.stage = stage or (lambda pages: pages)
        self._jobs: deque[AdapterSpec | None] = deque()
        self._done: deque[LoadResult] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, spec: AdapterSpec) -> None:
        if not self.threaded:
            self._finish(self._load(spec))
            return
        with self._cond:
            if self._thread is None:          # started on first use: most engines never load
                self._thread = threading.Thread(target=self._run, name="lorafleet-adapter-loader",
                                                daemon=True)
                self._thread.start()
            self._jobs.append(spec)
            self._cond.notify_all()

    def completed(self) -> list[LoadResult]:
        with self._cond:
            done = list(self._done)
            self._done.clear()
        return done

    def wait(self, timeout: float) -> bool:
        """Block until a load has finished (True) or `timeout` seconds passed (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._done), timeout)

    def close(self) -> None:
        with self._cond:
            self._jobs.appendleft(None)
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._jobs))
                spec = self._jobs.popleft()
            if spec is None:
                return
            self._finish(self._load(spec))

    def _finish(self, result: LoadResult) -> None:
        with self._cond:
            self._done.append(result)
            self._cond.notify_all()

    def _load(self, spec: AdapterSpec) -> LoadResult:
        started = time.perf_counter()
        pages, error = None, None
        try:
            # A store's folder is confined again: its files may have changed since.
            path = spec.path if spec.root is None else confine(spec.path, spec.root)
            pages = self.stage(self.read(spec, path, self.dtype))
        except (LoraFleetError, OSError, ValueError, RuntimeError) as exc:
            # A bad file fails that adapter's requests only (the engine reads the error).
            error = f"adapter {spec.name!r} could not be loaded from {spec.path}: {exc}"
            log.warning("%s", error)
        except Exception as exc:  # a bug here must fail one adapter, not stop all loads
            log.exception("loading adapter %r failed unexpectedly", spec.name)
            error = f"adapter {spec.name!r} could not be loaded: internal error ({exc})"
        return LoadResult(spec.name, spec.version, pages, error, time.perf_counter() - started)


class HostCache:
    """Page copies of adapters in host memory, keyed by (name, version): the LRU cache (at most
    `max_count` copies and `max_bytes` bytes; None = no limit of that kind, max_count None or 0
    = no cache) and the staged copies on their way into the pool (at most `max_staged`, oldest
    dropped first: it is read again if still wanted)."""

    def __init__(self, max_count: int | None, max_bytes: int | None, max_staged: int):
        self.max_count, self.max_bytes, self.max_staged = max_count or 0, max_bytes, max_staged
        self.cached: OrderedDict[str, tuple[int, torch.Tensor]] = OrderedDict()   # LRU first
        self.staged: OrderedDict[str, tuple[int, torch.Tensor]] = OrderedDict()
        self.hits = self.dropped = 0

    def get(self, name: str, version: int) -> tuple[torch.Tensor | None, bool]:
        """(pages, from the cache) for the current registration; (None, False) if absent."""
        entry = self.staged.get(name)
        if entry is not None and entry[0] == version:
            return entry[1], False
        entry = self.cached.get(name)
        if entry is not None and entry[0] == version:
            return entry[1], True
        return None, False

    def stage(self, name: str, version: int, pages: torch.Tensor) -> None:
        self.staged[name] = (version, pages)
        self.staged.move_to_end(name)
        while len(self.staged) > self.max_staged:
            self.staged.popitem(last=False)
            self.dropped += 1

    def entered_pool(self, name: str, from_cache: bool) -> None:
        """The copy of `name` was written into the pool: keep it in the cache (most recently
        used) or drop it when there is no cache."""
        if from_cache:
            self.hits += 1
            self.cached.move_to_end(name)
            return
        entry = self.staged.pop(name, None)
        if entry is not None and self.max_count > 0:
            self.cached[name] = entry
            self._trim()

    def discard(self, name: str) -> None:
        self.staged.pop(name, None)
        self.cached.pop(name, None)

    @property
    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for _, p in self.cached.values())

    @property
    def staged_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for _, p in self.staged.values())

    def _trim(self) -> None:
        while self.cached and (len(self.cached) > self.max_count or (
                self.max_bytes is not None and self.num_bytes > self.max_bytes)):
            self.cached.popitem(last=False)
