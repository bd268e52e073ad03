"""The CUDA page copier's ordering (page_copy.py), driven on CPU through fake streams and events.

The fake copy stream is as lazy as a real one may be: the data of a copy lands in the pool only
when the compute stream waits on its event, or when the next step has finished (the copy
"overlapped" it). A step that read an adapter without waiting on its copy would read stale pages
(and give other tokens than the synchronous engine); a copy landing after its pages were reused
by the KV cache would clobber them. The log of stream operations shows the other direction: each
copy's stream waits on a compute event recorded after every step that read the pages it reuses.
The same engine on a real GPU: tests/test_cuda.py.
"""
from __future__ import annotations

import contextlib
import gc
import random
import weakref
from array import array
from pathlib import Path

import pytest
import torch

from lorafleet.serve import engine as engine_module
from lorafleet.serve.adapter_cache import AdapterCache
from lorafleet.serve.adapter_registry import AdapterSpec, BaseLayout
from lorafleet.serve.engine import Engine, EngineConfig, SamplingParams
from lorafleet.serve.page_copy import CudaPageCopier, PageCopier, StreamOps, make_page_copier
from lorafleet.serve.pool import ADAPTER, KV, PagePool

from .conftest import random_store


class FakeEvent:
    def __init__(self, world: "FakeCuda"):
        self.world, self.id = world, len(world.events)
        world.events.append(self)
        self.stream = None
        self.after_step = -1      # compute events: steps enqueued before it was recorded
        self.landed = True        # copy events: False until its copy's data is in the pool

    def record(self, stream: "FakeStream") -> None:
        self.stream = stream
        self.world.log.append(("record", stream.name, self.id))
        if stream.name == "compute":
            self.after_step = self.world.steps
        else:
            self.world.capture(self)

    def query(self) -> bool:
        return self.landed


class FakeStream:
    def __init__(self, world: "FakeCuda", name: str):
        self.world, self.name = world, name

    def wait_event(self, event: FakeEvent) -> None:
        self.world.log.append(("wait", self.name, event.id))
        if self.name == "compute" and event.stream.name == "copy":
            self.world.land(event)


class FakeCuda:
    """Streams and events that record what was asked, in order, and hold each copy's data back
    (the pool keeps its old contents) until the copy is waited on or a step has run since."""

    def __init__(self, pool_pages: torch.Tensor):
        self.pool_pages = pool_pages
        self.log: list[tuple] = []
        self.events: list[FakeEvent] = []
        self.pending: list[tuple[FakeEvent, torch.Tensor, torch.Tensor]] = []  # rows, values
        self.steps = 0
        self.current = "compute"       # the stream work is issued on
        self.compute = FakeStream(self, "compute")
        self.copy_streams: list[FakeStream] = []
        self._before: torch.Tensor | None = None

    def ops(self) -> StreamOps:
        def new_stream(device):
            stream = FakeStream(self, "copy")
            self.copy_streams.append(stream)
            return stream

        @contextlib.contextmanager
        def use_stream(stream):
            assert stream.name == "copy"
            self.log.append(("enter", stream.name))
            self._before = self.pool_pages.clone()
            self.current = stream.name
            yield
            self.current = "compute"
            self.log.append(("exit", stream.name))

        return StreamOps(new_stream=new_stream, new_event=lambda: FakeEvent(self),
                         current_stream=lambda device: (
                             self.copy_streams[-1] if self.current == "copy" else self.compute),
                         use_stream=use_stream,
                         pin=lambda t: t)

    def capture(self, event: FakeEvent) -> None:
        """A copy event recorded: take the rows the copy wrote out of the pool until it lands."""
        changed = (self.pool_pages != self._before).any(dim=1).nonzero().flatten()
        self.log.append(("copy", tuple(changed.tolist())))
        self.pending.append((event, changed, self.pool_pages[changed].clone()))
        self.pool_pages[changed] = self._before[changed]
        event.landed = False

    def land(self, event: FakeEvent | None = None) -> None:
        """Copies up to `event` (all, if None) land, in stream order."""
        while self.pending and not (event is not None and event.landed):
            done, rows, values = self.pending.pop(0)
            self.pool_pages[rows] = values
            done.landed = True

    def step(self, reads: set[str]) -> None:
        self.log.append(("step", self.steps, frozenset(reads)))
        self.steps += 1


HIDDEN = 4
LAYOUT = BaseLayout({"proj": (HIDDEN, HIDDEN)}, HIDDEN, 8)


def _spec(name: str, num_pages: int) -> AdapterSpec:
    """A file-backed spec of one square module: rank num_pages / 2 (A and B^T rows)."""
    spec = AdapterSpec(name, Path(f"/nonexistent/{name}"), LAYOUT, ("proj",),
                       array("i", [num_pages // 2]), array("d", [1.0]))
    assert spec.num_pages == num_pages
    return spec


def _cache(num_pages=8):
    pages = torch.zeros(num_pages, HIDDEN)
    world = FakeCuda(pages)
    copier = CudaPageCopier("cuda", world.ops())

    def write_pages(page_ids, host_pages):
        assert world.current == "copy", "the write runs on the copy stream"
        pages.index_copy_(0, torch.tensor(page_ids), host_pages)

    cache = AdapterCache(PagePool(num_pages), write_pages, copier=copier)
    return cache, copier, world, pages


def test_copy_into_reused_pages_waits_on_the_steps_that_read_them():
    cache, copier, world, pages = _cache()
    cache.register(_spec("a", 4), torch.full((4, HIDDEN), 1.0))
    cache.register(_spec("b", 6), torch.full((6, HIDDEN), 2.0))
    assert cache.pin("a")
    world.step({"a"})                         # step 0 reads a's pages
    cache.unpin("a")
    a_pages = list(cache.resident["a"])
    kv = cache.pool.alloc(4, KV)
    world.step(set())                         # step 1: the KV pages
    cache.pool.free(kv)
    assert cache.pin("b")                     # evicts a: b reuses a's pages and the KV ones
    b_pages = cache.resident["b"]
    assert cache.evictions == 1 and set(b_pages) & set(a_pages) and set(b_pages) & set(kv)
    log = world.log
    copy_b = max(i for i, e in enumerate(log) if e[0] == "copy")
    assert set(log[copy_b][1]) == set(b_pages)
    # The copy stream waited, before the copy, on a compute event recorded after step 1.
    waits = [e for e in log[:copy_b] if e[0] == "wait" and e[1] == "copy"]
    last_wait = world.events[waits[-1][2]]
    assert last_wait.stream.name == "compute" and last_wait.after_step == 2
    wait_at = log.index(("wait", "copy", last_wait.id))
    enter_b = max(i for i, e in enumerate(log[:copy_b]) if e == ("enter", "copy"))
    assert log.index(("step", 1, frozenset())) < wait_at < enter_b
    # pin (admission) made the compute stream wait on b's copy: its data is in the pool.
    record = log[copy_b - 1]
    assert record[:2] == ("record", "copy")
    assert log.index(("wait", "compute", record[2])) > copy_b
    assert (pages[b_pages] == 2.0).all() and not copier.unwaited
    cache.unpin("b")


def test_first_step_waits_on_the_copy_and_not_later_ones():
    cache, copier, world, pages = _cache()
    cache.register(_spec("a", 2), torch.full((2, 4), 5.0))
    assert cache.prefetch("a")                # copied, not yet used: nothing waits on it
    copy_event = copier.unwaited["a"]
    assert not copy_event.landed and (pages == 0).all()      # the data is still on its way
    assert not any(e[0] == "wait" and e[1] == "compute" for e in world.log)
    assert cache.pin("a")                     # admission: the coming step waits on the copy
    assert ("wait", "compute", copy_event.id) in world.log
    assert (pages[cache.resident["a"]] == 5.0).all()
    world.step({"a"})
    cache.unpin("a")
    waits_before = sum(e[:2] == ("wait", "compute") for e in world.log)
    assert cache.pin("a")                     # resident, its copy already waited on
    assert sum(e[:2] == ("wait", "compute") for e in world.log) == waits_before
    cache.unpin("a")


def test_evicting_an_unused_copy_orders_it_before_the_pages_reuse():
    cache, copier, world, pages = _cache()
    cache.register(_spec("a", 4), torch.full((4, 4), 7.0))
    assert cache.prefetch("a")
    event = copier.unwaited["a"]
    assert cache.reclaim(4) == 4              # evicted before any step used it
    assert ("wait", "compute", event.id) in world.log and event.landed
    kv = cache.pool.alloc(4, KV)
    pages[kv] = -1.0                          # the compute stream's KV writes, after the copy
    world.land()
    assert (pages[kv] == -1.0).all()
    cache.pool.free(kv)


def test_staging_memory_lives_until_its_copy_event_completes():
    cache, copier, world, pages = _cache()
    cache.register(_spec("f", 4))             # file-backed: its copy arrives staged
    staged = torch.full((4, 4), 3.0)
    ref = weakref.ref(staged)
    cache.host_cache.stage("f", cache.specs["f"].version, staged)
    del staged
    assert cache.prefetch("f")                # copied; no step has waited on it yet
    assert not cache.host_cache.staged        # the host tier let go of it (no host cache)
    gc.collect()
    assert ref() is not None and copier.pending == 1
    cache.poll()                              # collect: the event has not completed
    gc.collect()
    assert ref() is not None and copier.pending == 1
    world.land()                              # the copy stream got to it
    cache.poll()
    gc.collect()
    assert ref() is None and copier.pending == 0


def test_make_page_copier_is_synchronous_on_cpu():
    copier = make_page_copier(torch.device("cpu"))
    assert type(copier) is PageCopier
    host, written = torch.ones(2, 2), []
    copier.copy("a", [1, 3], host, lambda ids, p: written.append((ids, p)))
    assert written == [([1, 3], host)] and copier.pending == 0 and copier.stage(host) is host


# ---- the engine with the lazy fake copy stream, under eviction pressure ----------------------

NUM_ADAPTERS = 10
POOL_PAGES = 380          # small fleet adapters take 8-272 pages: a few fit beside the KV


@pytest.fixture(scope="module")
def store(small_fleet, tmp_path_factory):
    return random_store(small_fleet, tmp_path_factory.mktemp("page_copy") / "store",
                        [f"c{i:02d}" for i in range(NUM_ADAPTERS)], seed=500)


def _run(base_dir, store, workload, fake: bool):
    worlds = []
    real = engine_module.make_page_copier

    def fake_copier(device):
        worlds.append(FakeCuda(None))
        return CudaPageCopier("cuda", worlds[-1].ops())

    engine_module.make_page_copier = fake_copier if fake else real
    try:
        engine = Engine(base_dir, config=EngineConfig(
            num_pages=POOL_PAGES, block_tokens=4, max_num_seqs=4, dtype="float32",
            async_adapter_loading=False, max_adapters_per_step=2))
    finally:
        engine_module.make_page_copier = real
    engine.register_store(store)
    if fake:
        world = worlds[0]
        world.pool_pages = engine.runner.pages
        write = engine.cache.write_pages             # the runner's, as on a GPU

        def write_on_copy_stream(page_ids, pages):
            assert world.current == "copy"
            write(page_ids, pages)

        engine.cache.write_pages = write_on_copy_stream
        execute = engine.runner.execute

        def traced_execute(inputs):
            reads = {name for name, _ in inputs.runs if name is not None}
            copier = engine.cache.copier
            assert not reads & set(copier.unwaited), "a step reads a copy it did not wait on"
            world.step(reads)
            logits = execute(inputs)
            world.land()          # copies issued before this step finished during it
            return logits

        engine.runner.execute = traced_execute
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    for request_id, prompt, name in workload:
        engine.add_request(request_id, prompt, name, params)
    results = {}
    while engine.has_work():
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.new_token_ids)
        engine.pool.check()
    assert engine.pool.num_free == engine.pool.num_pages - engine.pool.used_by[ADAPTER]
    return results, engine, (worlds[0] if fake else None)


def test_engine_with_lazy_copy_stream_equals_synchronous_engine(small_fleet, store):
    base_dir, _, _ = small_fleet
    rng = random.Random(7)
    workload = []
    for i in range(24):
        name = None if i % 6 == 5 else f"c{rng.randrange(NUM_ADAPTERS):02d}"
        workload.append((f"r{i}", [rng.randrange(4, 380) for _ in range(rng.randint(2, 7))],
                         name))
    expected, _, _ = _run(base_dir, store, workload, fake=False)
    got, engine, world = _run(base_dir, store, workload, fake=True)
    stats = engine.stats()
    assert stats["cache_evictions"] >= 5 and stats["adapter_loads"] >= NUM_ADAPTERS
    assert got == expected
    copies = [e for e in world.log if e[0] == "copy"]
    assert len(copies) >= stats["adapter_loads"]
    # Every copy's stream waited, just before it, on a compute event recorded after every step
    # enqueued so far (the readers of the pages it reuses among them).
    for i, entry in enumerate(world.log):
        if entry == ("enter", "copy"):
            wait = world.log[i - 1]
            assert wait[:2] == ("wait", "copy")
            event = world.events[wait[2]]
            steps_before = sum(e[0] == "step" for e in world.log[:i])
            assert event.stream.name == "compute" and event.after_step == steps_before
    world.land()                              # the last copies (prefetches) get there
    engine.cache.copier.collect()
    assert engine.cache.copier.pending == 0
