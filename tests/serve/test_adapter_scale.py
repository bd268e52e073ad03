"""Adapters beyond the pool (issue 12): a store of 200+ adapters registered lazily (config and
header only), a pool that holds about five of them, reads on the loader thread while steps run.
Every request equals transformers + peft with its adapter alone; pages all free at the end; host
memory bounded; a slow read stalls nobody whose adapter is resident; a file corrupted after
registration fails only its own requests; folders added to the store at run time are found."""
from __future__ import annotations

import random
import shutil
import threading
import time
import tracemalloc

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafleet.adapters.store import AdapterStore
from lorafleet.errors import AdapterError, RequestError
from lorafleet.lora.peft_format import load_peft, write_adapter
from lorafleet.serve.adapter_cache import LOAD_AHEAD
from lorafleet.serve.engine import Engine, EngineConfig, SamplingParams

from .conftest import merged_oracle, oracle_greedy, random_store

NUM_ADAPTERS = 220
MAX_TOKENS = 4
# Adapters of the small fleet take 8-272 pages (ranks 1-8, 2-7 targets, 2 layers, H = 64): 700
# pages hold the running batch's KV and about five adapters.
POOL_PAGES = 700
MAX_CPU_LORAS = 3


@pytest.fixture(scope="module")
def store(small_fleet, tmp_path_factory):
    """A store of NUM_ADAPTERS PEFT folders: the small fleet's configs (ranks 1-8, four target
    sets, rsLoRA, rank_pattern) with random weights of their own each."""
    return random_store(small_fleet, tmp_path_factory.mktemp("scale") / "store",
                        [f"ad{i:03d}" for i in range(NUM_ADAPTERS)], seed=1000)


def _engine(base_dir, **config) -> Engine:
    config = dict(num_pages=POOL_PAGES, block_tokens=4, max_num_seqs=4, dtype="float32",
                  max_cpu_loras=MAX_CPU_LORAS) | config
    return Engine(base_dir, config=EngineConfig(**config))


def _drain(engine: Engine, check=None) -> dict:
    """Step to the end; {request id: (tokens, finish_reason, error)}."""
    results: dict = {}
    while engine.has_work():
        for out in engine.step():
            tokens, _, _ = results.get(out.request_id, ([], None, None))
            results[out.request_id] = (tokens + out.new_token_ids, out.finish_reason, out.error)
        engine.pool.check()
        if check is not None:
            check(engine)
    return results


def test_registration_is_header_only_and_small(small_fleet, store):
    base_dir, _, _ = small_fleet
    engine = _engine(base_dir)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    started = time.perf_counter()
    names = engine.register_store(store)
    seconds = time.perf_counter() - started
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert len(names) == NUM_ADAPTERS and engine.adapters() == names
    cache = engine.cache
    assert not cache.in_memory and not cache.loading and not cache.resident
    assert not cache.host_cache.cached and not cache.host_cache.staged
    # The weights alone are ~50 KB per adapter on average here: a spec is a small fraction.
    assert grown / NUM_ADAPTERS < 4096, f"{grown / NUM_ADAPTERS:.0f} bytes per adapter"
    assert seconds < 20          # tracemalloc slows it several times; 5,000 take ~s without


def test_many_adapters_small_pool_equal_peft(small_fleet, store):
    base_dir, base_model, _ = small_fleet
    engine = _engine(base_dir)
    engine.register_store(store)
    rng = random.Random(3)
    touched = rng.sample(range(NUM_ADAPTERS), 24)
    workload = []
    for i, index in enumerate(touched + touched[:6] + [None] * 4):
        name = None if index is None else f"ad{index:03d}"
        prompt = [rng.randrange(4, 380) for _ in range(rng.randint(2, 8))]
        workload.append((f"r{i}", prompt, name))
    rng.shuffle(workload)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    for i, (request_id, prompt, name) in enumerate(workload):
        engine.add_request(request_id, prompt, name, params, tenant=f"key{i % 3}")
    peak = {"host": 0, "staged": 0, "resident": 0}

    def check(engine):
        stats = engine.stats()
        peak["host"] = max(peak["host"], stats["host_cache_adapters"])
        peak["staged"] = max(peak["staged"], stats["host_staged_adapters"])
        peak["resident"] = max(peak["resident"], stats["adapters_resident"])

    results = _drain(engine, check)
    oracles = {}
    for request_id, prompt, name in workload:
        if name is not None and name not in oracles:
            oracles[name] = merged_oracle(base_model, store / name)
        model = base_model if name is None else oracles[name]
        tokens, reason, error = results[request_id]
        assert error is None and reason == "length"
        assert tokens == oracle_greedy(model, prompt, MAX_TOKENS), (request_id, name)
    stats = engine.stats()
    assert stats["cache_evictions"] > 0 and stats["adapter_loads"] >= 24
    assert peak["resident"] <= 12                       # the pool holds a handful, never all
    assert peak["host"] <= MAX_CPU_LORAS and peak["staged"] <= LOAD_AHEAD
    assert stats["host_cache_bytes"] <= MAX_CPU_LORAS * 300 * 64 * 4
    assert stats["adapter_load_seconds_count"] == stats["adapter_loads"]
    assert stats["queue_wait_seconds_count"] >= len(workload)


def test_slow_read_does_not_stall_requests_on_resident_adapters(small_fleet, store):
    base_dir, base_model, _ = small_fleet
    engine = _engine(base_dir)
    engine.register_store(store)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    engine.add_request("warm", [5, 6, 7], "ad001", params)
    _drain(engine)                                       # ad001 now resident
    gate, real_read = threading.Event(), engine.cache.loader.read

    def slow_read(spec, path, dtype):
        if spec.name == "ad002":
            gate.wait(30)
        return real_read(spec, path, dtype)

    engine.cache.loader.read = slow_read
    engine.add_request("slow", [5, 6, 7], "ad002", params)
    engine.add_request("fast", [8, 9], "ad001", params)
    engine.add_request("base", [10, 11], None, params)
    done, steps = {}, 0
    while {"fast", "base"} - set(done):
        started = time.perf_counter()
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        assert time.perf_counter() - started < 2.0     # a step never waits for the read
        steps += 1
        assert steps < 100
    assert "slow" not in done and engine.requests["slow"].status.value == "waiting"
    assert "ad002" in engine.cache.loading
    gate.set()
    results = _drain(engine)
    assert results["slow"][0] == oracle_greedy(merged_oracle(base_model, store / "ad002"),
                                               [5, 6, 7], MAX_TOKENS)
    assert done["fast"].error is None and done["base"].error is None


@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_file_corrupted_after_registration_fails_only_its_requests(small_fleet, store,
                                                                   tmp_path, damage):
    base_dir, base_model, _ = small_fleet
    root = tmp_path / "store"
    for name in ("ad000", "ad003", "ad005"):
        shutil.copytree(store / name, root / name)
    engine = _engine(base_dir)
    assert engine.register_store(root) == ["ad000", "ad003", "ad005"]
    weights = root / "ad003" / "adapter_model.safetensors"
    original = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(original[: len(original) // 2])
    else:
        tensors = load_file(weights)
        key = sorted(tensors)[0]
        tensors[key][0, 0] = float("nan")
        save_file(tensors, weights)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    work = [("bad1", [5, 6], "ad003"), ("good1", [7, 8, 9], "ad000"),
            ("bad2", [9, 9], "ad003"), ("good2", [4, 5], "ad005"), ("base", [6, 6], None)]
    for request_id, prompt, name in work:
        engine.add_request(request_id, prompt, name, params)
    results = _drain(engine)
    for request_id, prompt, name in work:
        tokens, reason, error = results[request_id]
        if name == "ad003":
            assert reason == "error" and tokens == []
            assert "ad003" in error and str(weights) in error
            assert ("not a readable safetensors" if damage == "truncated" else "NaN or Inf") \
                in error
        else:
            model = base_model if name is None else merged_oracle(base_model, root / name)
            assert error is None and tokens == oracle_greedy(model, prompt, MAX_TOKENS)
    assert engine.stats()["adapter_load_failures"] == 1
    weights.write_bytes(original)                        # repaired: the next request works
    engine.add_request("again", [5, 6], "ad003", params)
    assert _drain(engine)["again"][0] == oracle_greedy(
        merged_oracle(base_model, root / "ad003"), [5, 6], MAX_TOKENS)


def test_store_folders_resolved_on_demand(small_fleet, store, tmp_path, caplog):
    base_dir, base_model, _ = small_fleet
    root = tmp_path / "store"
    shutil.copytree(store / "ad000", root / "ad000")
    shutil.copytree(store / "ad000", root / "bad name")       # junk: skipped
    (root / "notes").mkdir()                                   # no adapter_config.json
    shutil.copytree(store / "ad000", root / "cut")            # truncated: skipped, warned
    weights = root / "cut" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    engine = _engine(base_dir)
    with caplog.at_level("WARNING"):
        assert engine.register_store(AdapterStore(root)) == ["ad000"]
    assert "'bad name'" in caplog.text and "skipping 'cut'" in caplog.text
    shutil.rmtree(root / "cut")
    shutil.copytree(store / "ad007", root / "late")          # added while serving
    assert engine.adapters() == ["ad000"]
    assert engine.resolvable_adapters() == ["ad000", "late"]
    assert engine.resolve_adapter("late") and engine.adapters() == ["ad000", "late"]
    assert engine.resolve_adapter("late") and engine.resolve_adapter("ad000")
    assert engine.cache.loading == {} and not engine.cache.host_cache.staged   # no tensors
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    engine.add_request("r", [5, 6, 7], "late", params, tenant="key1")
    assert engine.requests["r"].tenant == "key1"
    assert _drain(engine)["r"][0] == oracle_greedy(merged_oracle(base_model, store / "ad007"),
                                                   [5, 6, 7], MAX_TOKENS)
    for missing in ("nope", "../ad000", "bad name", "notes", "__base__", "", "a" * 200):
        assert engine.resolve_adapter(missing) is False
    # A folder that exists but is not a valid adapter for this base: AdapterError.
    shutil.copytree(store / "ad001", root / "broken")
    (root / "broken" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="invalid JSON"):
        engine.resolve_adapter("broken")
    # Files that resolve outside the store are refused, even through a symlink.
    outside = tmp_path / "outside"
    shutil.copytree(store / "ad002", outside)
    (root / "escape").mkdir()
    shutil.copy(outside / "adapter_config.json", root / "escape")
    (root / "escape" / "adapter_model.safetensors").symlink_to(
        outside / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="outside the adapter store"):
        engine.resolve_adapter("escape")
    assert "escape" not in engine.adapters() and "broken" not in engine.adapters()


def test_adapter_names_checked_at_every_entry(small_fleet, store):
    base_dir, _, _ = small_fleet
    engine = _engine(base_dir)
    for name in ("__base__", "../x", "a/b", " lead", "x" * 129, "tab\tname", "*"):
        with pytest.raises(AdapterError, match="adapter name"):
            engine.register_adapter(name, store / "ad000")
        with pytest.raises(RequestError, match="unknown adapter"):
            engine.add_request("r", [5, 6], name)
    config, tensors = load_peft(store / "ad000").config, load_peft(store / "ad000").tensors
    with pytest.raises(AdapterError, match="adapter name"):
        engine.register_adapter_tensors("__base__", config, tensors)
    assert engine.adapters() == []


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_loader_pages_equal_torch_conversion(small_fleet, store, tmp_path, file_dtype,
                                             page_dtype):
    """The loader's numpy path (file_pages: read, check, convert, lay out) gives exactly the
    pages of the torch path (adapter_pages), bf16 rounding included."""
    from lorafleet.serve.adapter_registry import adapter_pages, file_pages, read_spec

    base_dir, _, _ = small_fleet
    engine = _engine(base_dir)
    source = load_peft(store / "ad003")                 # all seven projections, rank 8
    write_adapter(tmp_path / "a", source.config,
                  {k: (t * 1.37).to(file_dtype) for k, t in source.tensors.items()})
    spec = read_spec("a", tmp_path / "a", engine.adapter_layout)
    expected = adapter_pages(spec, load_peft(tmp_path / "a"), page_dtype)
    got = file_pages(spec, tmp_path / "a", page_dtype)
    assert got.dtype == page_dtype and torch.equal(got, expected)


def test_one_tenants_flood_does_not_queue_another(small_fleet):
    """Admission takes tenants in turn: a request of a second tenant behind twelve of the first
    runs in the first batch, not after the flood."""
    base_dir, base_model, _ = small_fleet
    engine = _engine(base_dir, max_num_seqs=2)
    flood = SamplingParams(max_tokens=6, ignore_eos=True)
    for i in range(12):
        engine.add_request(f"a{i}", [5, 6, 7], None, flood, tenant="flood")
    engine.add_request("b0", [8, 9], None, SamplingParams(max_tokens=2, ignore_eos=True),
                       tenant="other")
    first = [out.new_token_ids for out in engine.step() if out.request_id == "b0"]
    assert {s.request_id for s in engine.scheduler.running} == {"a0", "b0"}
    results = _drain(engine)
    assert first[0] + results["b0"][0] == oracle_greedy(base_model, [8, 9], 2)
    assert engine.stats()["queue_wait_seconds_count"] == 13
