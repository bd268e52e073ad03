"""The scheduler alone (plain Python): admission by pages and budget, chunked prefill beside
decode rows, preemption by recompute, adapter cap, early abort. A small fake adapter cache
stands in for the real one; `run` plays the engine's part after each step."""
import subprocess
import sys
from pathlib import Path

import pytest

from lorafleet.serve import kv_cache, pool, scheduler, sequence
from lorafleet.serve.kv_cache import KVCacheManager, KVLayout
from lorafleet.serve.pool import ADAPTER, PagePool
from lorafleet.serve.scheduler import Scheduler, SchedulerConfig
from lorafleet.serve.sequence import Sequence, SeqStatus


class FakeAdapters:
    """Each adapter takes `size` pages; same pin/unpin/reclaim/prefetch contract."""

    def __init__(self, pool, size=4):
        self.pool, self.size, self.resident, self.refs = pool, size, {}, {}

    def pin(self, name, reserve=0):
        if name not in self.resident:
            short = self.size + reserve - self.pool.num_free
            evictable = sum(self.size for k in self.resident if not self.refs.get(k))
            if short > evictable:
                return False                 # as the real cache: nothing changed
            if short > 0:
                self.reclaim(short)
            if self.size + reserve > self.pool.num_free:
                return False
            self.resident[name] = self.pool.alloc(self.size, ADAPTER)
        self.refs[name] = self.refs.get(name, 0) + 1
        return True

    def unpin(self, name):
        self.refs[name] -= 1

    def reclaim(self, n):
        freed = 0
        for name in [k for k in self.resident if not self.refs.get(k)]:
            if freed >= n:
                break
            self.pool.free(self.resident.pop(name))
            freed += self.size
        return freed

    def prefetch(self, name):
        return False

    def ready(self, name):
        return True


class PrefetchingAdapters(FakeAdapters):
    """Prefetch as the real cache does: into free pages only, no reference taken."""

    def __init__(self, pool, size=4):
        super().__init__(pool, size)
        self.prefetched = []

    def prefetch(self, name):
        if name in self.resident:
            return True
        if self.size > self.pool.num_free:
            return False
        self.resident[name] = self.pool.alloc(self.size, ADAPTER)
        self.prefetched.append(name)
        return True


def make(num_pages=64, adapters=FakeAdapters, **config):
    pool_ = PagePool(num_pages)
    kv = KVCacheManager(pool_, KVLayout(num_layers=1, kv_dim=64, page_size=64,
                                        block_tokens_hint=2))   # 2 tokens = 4 pages
    clock = [0.0]
    sched = Scheduler(SchedulerConfig(**config), kv, adapters(pool_), clock=lambda: clock[0])
    return sched, pool_, clock


def seq(rid, n, adapter=None, t=0.0):
    return Sequence(rid, list(range(n)), adapter, None, t, max_tokens=100)


def run(batch, token=7):
    """What the engine does with a step: the scheduled tokens are computed; a sequence that
    reached its end samples one (appended)."""
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
        assert s.num_computed_tokens <= s.num_tokens
        if s.num_computed_tokens == s.num_tokens:
            s.output_ids.append(token)
    return batch


def plan(batch):
    """{request id: tokens this step}, and which are decode rows."""
    return ({s.request_id: n for s, n in zip(batch.seqs, batch.num_new_tokens)},
            [s.request_id for s in batch.seqs[:batch.num_decode]])


# Import the plain-Python modules in a fresh interpreter where `import torch` fails (None in
# sys.modules makes any import of it raise), with the packages' __init__ (which import the torch
# engine) bypassed: catches `from torch import ...`, aliases and imports through other modules.
NO_TORCH = """
import sys, types
sys.modules["torch"] = None
for name, path in [("lorafleet", sys.argv[1]), ("lorafleet.serve", sys.argv[2])]:
    package = types.ModuleType(name)
    package.__path__ = [path]
    sys.modules[name] = package
for module in sys.argv[3:]:
    __import__("lorafleet.serve." + module)
try:
    import torch
except ImportError:
    print("torch blocked")
"""


def test_plain_python_no_torch():
    serve_dir = Path(pool.__file__).parent
    modules = [Path(m.__file__).stem for m in (pool, kv_cache, scheduler, sequence)]
    done = subprocess.run([sys.executable, "-c", NO_TORCH, str(serve_dir.parent), str(serve_dir),
                           *modules], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "torch blocked"
    # The check itself can fail: a torch-importing module (the runner) is refused.
    done = subprocess.run([sys.executable, "-c", NO_TORCH, str(serve_dir.parent), str(serve_dir),
                           "lora_ops"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "torch" in done.stderr


def test_prefill_then_decode_and_token_budget():
    """enable_chunked_prefill=False: a step is all prefill (whole prompts within the budget)
    or all decode."""
    sched, pool_, _ = make(max_num_batched_tokens=10, enable_chunked_prefill=False)
    for i, n in enumerate([6, 4, 3]):
        sched.add(seq(f"s{i}", n))
    batch = run(sched.schedule())
    assert batch.is_prefill and plan(batch) == ({"s0": 6, "s1": 4}, [])
    batch = run(sched.schedule())
    assert batch.is_prefill and plan(batch) == ({"s2": 3}, [])
    batch = run(sched.schedule())
    assert not batch.is_prefill and plan(batch) == ({"s0": 1, "s1": 1, "s2": 1},
                                                    ["s0", "s1", "s2"])
    pool_.check()


def test_chunked_prefill_beside_decode_rows():
    """Decode rows first (one token each), then the partly prefilled prompt continues, then
    waiting prompts, within max_num_batched_tokens; a long prompt takes several steps."""
    sched, pool_, _ = make(num_pages=128, max_num_batched_tokens=10)
    for i, n in enumerate([6, 25, 3]):
        sched.add(seq(f"s{i}", n))
    assert plan(run(sched.schedule())) == ({"s0": 6, "s1": 4}, [])
    # s0 decodes; s1 continues (9 = budget - one decode row); s2 waits behind it (FCFS).
    assert plan(run(sched.schedule())) == ({"s0": 1, "s1": 9}, ["s0"])
    batch = run(sched.schedule())
    assert plan(batch) == ({"s0": 1, "s1": 9}, ["s0"])
    assert batch.is_prefill and batch.num_prefill_tokens == 9
    s1 = sched.running[1]
    assert s1.num_computed_tokens == 22 and not s1.output_ids   # no token before the last chunk
    # s1's last 3 prompt tokens, then s2 is admitted with the rest of the budget.
    assert plan(run(sched.schedule())) == ({"s0": 1, "s1": 3, "s2": 3}, ["s0"])
    assert s1.output_ids == [7]
    batch = run(sched.schedule())
    assert plan(batch) == ({"s0": 1, "s1": 1, "s2": 1}, ["s0", "s1", "s2"])
    assert not batch.is_prefill and batch.num_prefill_tokens == 0
    # A chunked prompt had the pages for all its tokens from admission.
    assert sched.kv.num_tokens_held("s1") >= 26
    pool_.check()


def test_a_one_token_last_chunk_is_still_prefill():
    sched, _, _ = make(num_pages=128, max_num_batched_tokens=10)
    sched.add(seq("s", 11))
    assert plan(run(sched.schedule())) == ({"s": 10}, [])
    batch = run(sched.schedule())
    assert plan(batch) == ({"s": 1}, []) and batch.num_prefill_tokens == 1
    assert batch.seqs[0].output_ids == [7]
    assert plan(run(sched.schedule())) == ({"s": 1}, ["s"])


def test_decode_rows_are_never_cut_by_the_budget():
    sched, _, _ = make(num_pages=128, max_num_batched_tokens=3, max_num_seqs=8)
    for i in range(4):
        sched.add(seq(f"s{i}", 1))
    assert plan(run(sched.schedule()))[0] == {"s0": 1, "s1": 1, "s2": 1}
    sched.add(seq("late", 4))
    # Three decode rows fill the budget; s3 and the late prompt wait, decode goes on.
    assert plan(run(sched.schedule())) == ({"s0": 1, "s1": 1, "s2": 1}, ["s0", "s1", "s2"])
    for s in list(sched.running):
        sched.finish(s, "length")
    assert plan(run(sched.schedule()))[0] == {"s3": 1, "late": 2}


@pytest.mark.parametrize("chunked", [True, False])
def test_out_of_pages_preempts_newest_and_recomputes(chunked):
    sched, pool_, _ = make(num_pages=16, enable_chunked_prefill=chunked)   # 4 blocks of 2 tokens
    sched.add(seq("old", 2))
    sched.add(seq("new", 2))
    assert len(run(sched.schedule()).seqs) == 2   # 8 pages used, one token sampled each
    for _ in range(3):                       # 3, 4, then 5 tokens each: 3 blocks needed
        batch = run(sched.schedule())
        pool_.check()
    assert [s.request_id for s in batch.seqs] == ["old"] and batch.num_preempted == 1
    preempted = sched.waiting[0]
    assert preempted.request_id == "new" and preempted.status is SeqStatus.WAITING
    assert preempted.num_preemptions == 1 and "new" not in sched.kv
    assert preempted.num_computed_tokens == 0 and preempted.output_ids == [7, 7, 7]
    sched.finish(sched.running[0], "length")
    batch = sched.schedule()                 # recompute: prompt + output so far
    assert plan(batch) == ({"new": 5}, [])
    assert sched.kv.num_tokens_held("new") >= preempted.num_tokens
    run(batch)
    assert preempted.output_ids == [7, 7, 7, 7]


def test_preemption_drops_a_partly_prefilled_prompt_first():
    """Decode rows need pages: the newest running sequence, here a prompt half prefilled, gives
    back its pages and starts over later."""
    sched, pool_, _ = make(num_pages=24, max_num_batched_tokens=4)   # 6 blocks of 2 tokens
    sched.add(seq("old", 3))
    sched.add(seq("long", 8))
    assert plan(run(sched.schedule())) == ({"old": 3, "long": 1}, [])
    assert plan(run(sched.schedule())) == ({"old": 1, "long": 3}, ["old"])
    long = sched.running[1]
    assert long.num_computed_tokens == 4
    # old now needs a third block (5 tokens); long holds the other 4 blocks: it is preempted,
    # and cannot come back while old holds 3 blocks.
    batch = run(sched.schedule())
    assert plan(batch) == ({"old": 1}, ["old"]) and batch.num_preempted == 1
    assert list(sched.waiting) == [long] and long.num_computed_tokens == 0
    assert "long" not in sched.kv
    pool_.check()
    sched.finish(sched.running[0], "length")
    assert plan(run(sched.schedule())) == ({"long": 4}, [])     # starts over


@pytest.mark.parametrize("chunked", [True, False])
def test_adapter_cap_and_eviction_of_unused_adapters(chunked):
    sched, pool_, _ = make(num_pages=40, max_adapters_per_step=2, enable_chunked_prefill=chunked)
    for i, name in enumerate(["x", "y", "z", "x"]):
        sched.add(seq(f"s{i}", 2, name))
    batch = sched.schedule()
    # z would be a third adapter: passed over, not waited for; the second x joins its adapter.
    assert [s.adapter for s in batch.seqs] == ["x", "y", "x"]
    for s in list(sched.running):
        sched.finish(s, "length")
    assert sched.adapters.refs == {"x": 0, "y": 0}
    batch = sched.schedule()
    assert [s.adapter for s in batch.seqs] == ["z"]
    pool_.check()


class LoadingAdapters(FakeAdapters):
    """Adapters in `loading` are still being read from disk: pin fails until they arrive."""

    def __init__(self, pool, size=4):
        super().__init__(pool, size)
        self.loading = set()

    def pin(self, name, reserve=0):
        return name not in self.loading and super().pin(name, reserve)

    def ready(self, name):
        return name not in self.loading


@pytest.mark.parametrize("chunked", [True, False])
def test_requests_whose_adapter_is_loading_are_passed_over(chunked):
    sched, pool_, _ = make(num_pages=64, adapters=LoadingAdapters, enable_chunked_prefill=chunked)
    sched.adapters.loading = {"slow"}
    for i, name in enumerate(["slow", "x", None, "slow"]):
        sched.add(seq(f"s{i}", 2, name))
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["s1", "s2"]
    assert [s.request_id for s in sched.waiting] == ["s0", "s3"]
    sched.adapters.loading = set()               # arrived
    run(batch)
    batch = sched.schedule()
    assert {s.request_id for s in batch.seqs[batch.num_decode:]} == {"s0", "s3"}
    pool_.check()


def test_aging_bound_stops_admission_behind_a_passed_over_request():
    """A request that cannot be admitted is passed over by at most max_overtakes later
    requests; then admission waits for it, and it goes first once it can."""
    sched, pool_, _ = make(num_pages=64, adapters=LoadingAdapters, max_overtakes=3,
                           max_num_seqs=2)
    sched.adapters.loading = {"slow"}
    sched.add(seq("s0", 2, "slow"))
    for i in range(1, 9):
        sched.add(seq(f"x{i}", 2))

    def step():
        batch = sched.schedule()
        for s in list(sched.running):
            sched.finish(s, "length")
        return [s.request_id for s in batch.seqs]

    assert step() == ["x1", "x2"] and step() == ["x3", "x4"]
    assert step() == [] and step() == []     # 4 > 3 overtakes: nothing passes s0 any more
    sched.adapters.loading = set()
    assert step() == ["s0", "x5"]
    pool_.check()


def test_round_robin_across_tenants():
    """A flood from tenant a does not queue tenant b's requests behind it."""
    sched, pool_, _ = make(num_pages=64, max_num_seqs=4)
    for i in range(10):
        s = seq(f"a{i}", 2)
        s.tenant = "a"
        sched.add(s)
    for i in range(2):
        s = seq(f"b{i}", 2)
        s.tenant = "b"
        sched.add(s)
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["a0", "b0", "a1", "b1"]
    for s in list(sched.running):
        sched.finish(s, "length")
    assert [s.request_id for s in sched.schedule().seqs] == ["a2", "a3", "a4", "a5"]


@pytest.mark.parametrize("chunked", [True, False])
def test_early_abort_of_queued_requests_past_deadline(chunked):
    sched, _, clock = make(num_pages=4, first_token_deadline_s=1.0, enable_chunked_prefill=chunked)
    sched.add(seq("a", 2))
    sched.add(seq("b", 2))          # 4 pages hold one request: b and c wait
    sched.add(seq("c", 2, t=0.5))
    sched.schedule()
    clock[0] = 1.2
    batch = sched.schedule()
    assert {s.request_id for s in batch.aborted} == {"b"}
    assert all(s.finish_reason == "deadline" for s in batch.aborted)
    assert [s.request_id for s in sched.waiting] == ["c"]


@pytest.mark.parametrize("chunked", [True, False])
def test_abort_from_any_queue_frees_pages(chunked):
    sched, pool_, _ = make(enable_chunked_prefill=chunked)
    sched.add(seq("a", 3, "x"))
    sched.add(seq("b", 3))
    sched.schedule()
    sched.add(seq("c", 3))
    assert sched.abort("a").finish_reason == "abort"
    assert sched.abort("c").finish_reason == "abort"
    assert sched.abort("zzz") is None
    assert sched.adapters.refs["x"] == 0
    assert pool_.used_by["kv"] == 8      # b: 3 tokens = 2 blocks of 4 pages
    pool_.check()


@pytest.mark.parametrize("chunked", [True, False])
def test_queued_adapters_are_prefetched_before_admission(chunked):
    sched, pool_, _ = make(num_pages=40, adapters=PrefetchingAdapters, max_num_seqs=1,
                           enable_chunked_prefill=chunked)
    for i, name in enumerate(["x", "y", "z"]):
        sched.add(seq(f"s{i}", 2, name))
    batch = sched.schedule()
    assert [s.adapter for s in batch.seqs] == ["x"]
    # While s0 runs, the next queued request's adapter (max_num_seqs of them) is loaded,
    # unpinned (evictable).
    assert sched.adapters.prefetched == ["y"]
    assert set(sched.adapters.resident) == {"x", "y"}
    assert sched.adapters.refs == {"x": 1}
    pages_before = pool_.used_by["adapter"]
    sched.finish(sched.running[0], "length")
    batch = sched.schedule()
    assert [s.adapter for s in batch.seqs] == ["y"]
    assert sched.adapters.refs == {"x": 0, "y": 1}
    assert sched.adapters.prefetched == ["y", "z"]      # and now z, behind it
    assert pool_.used_by["adapter"] == pages_before + 4  # admitting y loaded nothing
    pool_.check()


def test_no_adapter_brought_in_once_a_request_lacked_pages():
    """When a request could not get pages, admission goes on only with requests whose adapter
    is resident: bringing in another adapter would evict one that queued requests use."""
    sched, pool_, _ = make(num_pages=20)
    sched.add(seq("hold", 6))                       # 12 pages, stays running
    sched.schedule()
    sched.add(seq("sx", 2, "x"))
    sched.schedule()
    sched.finish(sched.running[-1], "length")       # x stays resident, unreferenced
    assert pool_.num_free == 4 and sched.adapters.refs == {"x": 0}
    sched.add(seq("big", 8, "y"))                   # 4 + 16 pages: cannot fit
    sched.add(seq("sz", 2, "z"))                    # would fit by evicting x
    sched.add(seq("sx2", 2, "x"))                   # fits as is
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["hold", "sx2"]
    assert set(sched.adapters.resident) == {"x"}
    pool_.check()
