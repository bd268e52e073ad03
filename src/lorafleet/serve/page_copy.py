"""Copying an adapter's host pages into the pool: at once on CPU, on a side stream on CUDA.

S-LoRA (sec. 5.2) overlaps adapter loading with the running batch's compute. On CUDA the copy
host (pinned) -> pool pages is issued on a dedicated copy stream, so it runs while the compute
stream runs the step; two events order it, and the host never waits on either:

- **Reused pages (write after read).** Pages an eviction or a finished request just freed may
  still be read by steps already enqueued on the compute stream. Before each copy an event is
  recorded on the compute stream (it completes once everything enqueued so far, among it the
  last step that read those pages, has run) and the copy stream waits on it. The engine samples
  on the host every step, so the compute stream is nearly idle when a copy is issued: the wait
  costs nothing, and the copy overlaps the *next* step.
- **First use (read after write).** An event is recorded on the copy stream after the copy; the
  adapter is ready for scheduling as soon as the copy is issued, and the compute stream waits on
  that event before the first step that reads it (`before_use`, from `AdapterCache.pin`), and
  before its pages can be reused by compute (`freed`: an adapter prefetched, never used, then
  evicted, its pages taken by the KV cache). Later steps are ordered after it by stream order.
- **Host memory.** A copy from pageable memory is not asynchronous (CUDA stages it and the host
  waits), so host page copies are pinned once, where they are made (`stage`: the loader thread,
  or registration of in-memory adapters). The staging tensor is kept referenced until the
  copy's event has completed (`collect`, every step): the host tier may drop its copy the moment
  the copy is issued. (The writer's small pinned index comes from PyTorch's pinned-memory cache,
  which itself holds a block back until the copies that read it have run.)

The write itself is the cache's writer (the runner's `write_pages`, or tensor parallelism's,
which also sends each worker its shard), issued with the copy stream current.

`PageCopier` is the CPU version (a plain synchronous write, no streams, nothing pending);
`CudaPageCopier` has the same interface. Its stream and event operations go through
`StreamOps`, so tests drive the ordering with a fake recorder on a machine without a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch

WritePages = Callable[[list[int], torch.Tensor], None]

__all__ = ["CudaPageCopier", "PageCopier", "StreamOps", "make_page_copier"]


class PageCopier:
    """Synchronous copies (CPU): `write(page_ids, pages)` is done when `copy` returns."""

    def stage(self, pages: torch.Tensor) -> torch.Tensor:
        """The host copy in the form copies want (any thread). CPU: as it is."""
        return pages

    def copy(self, key: str, page_ids: list[int], pages: torch.Tensor, write: WritePages) -> None:
        """Write host `pages` [n, H] into pool pages `page_ids` for adapter `key`. write: the
        cache's writer (the runner's, or tensor parallelism's that also feeds the workers)."""
        write(page_ids, pages)

    def before_use(self, key: str) -> None:
        """A step about to be enqueued reads `key`'s pages."""

    def freed(self, key: str) -> None:
        """`key`'s pages were freed (evicted): they may be reused by anything next."""

    def collect(self) -> None:
        """Release host memory of copies that have finished (every step)."""

    @property
    def pending(self) -> int:
        """Copies whose host memory is still held (not known to have finished)."""
        return 0


@dataclass
class StreamOps:
    """The CUDA calls the copier makes (tests pass fakes that record the order)."""
    new_stream: Callable[[torch.device], Any] = lambda device: torch.cuda.Stream(device=device)
    new_event: Callable[[], Any] = torch.cuda.Event
    current_stream: Callable[[torch.device], Any] = torch.cuda.current_stream
    use_stream: Callable[[Any], ContextManager] = torch.cuda.stream
    pin: Callable[[torch.Tensor], torch.Tensor] = (
        lambda t: t if t.is_pinned() else t.pin_memory())


class CudaPageCopier(PageCopier):
    """Copies on a side stream of `device`, ordered by events (module docstring)."""

    def __init__(self, device: torch.device | str, ops: StreamOps | None = None):
        self.device, self.ops = torch.device(device), ops or StreamOps()
        self.stream = self.ops.new_stream(self.device)
        self.unwaited: dict[str, Any] = {}     # key -> copy event no compute work waits on yet
        self.in_flight: list[tuple[Any, torch.Tensor]] = []   # (copy event, host pages it reads)

    def stage(self, pages: torch.Tensor) -> torch.Tensor:
        return self.ops.pin(pages)

    def copy(self, key: str, page_ids: list[int], pages: torch.Tensor, write: WritePages) -> None:
        self.collect()
        reads_done = self.ops.new_event()      # (a): every step enqueued so far, readers included
        reads_done.record(self.ops.current_stream(self.device))
        self.stream.wait_event(reads_done)
        pages = self.ops.pin(pages)            # already pinned when staged (no copy then)
        with self.ops.use_stream(self.stream):
            # The writer's device temporaries are allocated on the copy stream: the caching
            # allocator reuses their blocks only for later work on it, so freeing them is safe.
            write(page_ids, pages)
            copied = self.ops.new_event()
            copied.record(self.stream)
        self.unwaited[key] = copied             # (b): waited on by the first step reading it
        self.in_flight.append((copied, pages))

    def before_use(self, key: str) -> None:
        copied = self.unwaited.pop(key, None)
        if copied is not None:
            self.ops.current_stream(self.device).wait_event(copied)

    def freed(self, key: str) -> None:
        # Compute work that reuses these pages (KV writes) must come after the copy into them;
        # copies that reuse them are on the copy stream, after it already.
        self.before_use(key)

    def collect(self) -> None:
        # Event.query() asks without blocking; copies finish in order on one stream.
        while self.in_flight and self.in_flight[0][0].query():
            self.in_flight.pop(0)

    @property
    def pending(self) -> int:
        return len(self.in_flight)


def make_page_copier(device: torch.device | str) -> PageCopier:
    """The copier for the pool's device: on a side stream for CUDA, synchronous otherwise."""
    if torch.device(device).type == "cuda":
        return CudaPageCopier(device)
    return PageCopier()
