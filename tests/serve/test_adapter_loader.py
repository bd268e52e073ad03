"""The host side of adapters alone: the host cache's caps (count, bytes, staged) and LRU order,
and the loader thread's error path (a failed read is a result, not a dead thread)."""
from __future__ import annotations

from array import array
from pathlib import Path

import torch

from lorafleet.errors import AdapterError
from lorafleet.serve.adapter_loader import AdapterLoader, HostCache
from lorafleet.serve.adapter_registry import AdapterSpec, BaseLayout


def _pages(n):
    return torch.zeros(n, 4)        # n pages of 4 float32: 16 bytes each


def test_cache_caps_by_count_and_lru_order():
    cache = HostCache(max_count=2, max_bytes=None, max_staged=8)
    for name in "abc":
        cache.stage(name, 1, _pages(1))
        assert cache.get(name, 1) == (cache.staged[name][1], False)
        cache.entered_pool(name, from_cache=False)        # staged -> cached
    assert list(cache.cached) == ["b", "c"] and not cache.staged
    pages, from_cache = cache.get("b", 1)
    assert from_cache and pages is not None
    cache.entered_pool("b", from_cache=True)              # a hit: most recently used
    cache.stage("d", 1, _pages(1))
    cache.entered_pool("d", from_cache=False)
    assert list(cache.cached) == ["b", "d"] and cache.hits == 1
    assert cache.get("b", 2) == (None, False)             # another registration's copy


def test_cache_caps_by_bytes_and_no_cache_keeps_nothing():
    cache = HostCache(max_count=10, max_bytes=100, max_staged=8)
    for name, n in (("a", 2), ("b", 2), ("c", 3)):        # 32 + 32 + 48 bytes
        cache.stage(name, 1, _pages(n))
        cache.entered_pool(name, from_cache=False)
    assert list(cache.cached) == ["b", "c"] and cache.num_bytes == 80
    off = HostCache(max_count=None, max_bytes=None, max_staged=8)
    off.stage("a", 1, _pages(2))
    off.entered_pool("a", from_cache=False)
    assert not off.cached and not off.staged


def test_staged_copies_are_bounded():
    cache = HostCache(max_count=0, max_bytes=None, max_staged=2)
    for name in "abc":
        cache.stage(name, 1, _pages(1))
    assert list(cache.staged) == ["b", "c"] and cache.dropped == 1


def test_failed_read_is_a_result_and_the_thread_lives_on(tmp_path):
    layout = BaseLayout({"m": (4, 4)}, page_size=4, max_rank=8)
    specs = [AdapterSpec(name, Path(tmp_path / name), layout, ("m",), array("I", [2]),
                         array("d", [1.0]), version=1) for name in ("bad", "good")]
    loader = AdapterLoader(torch.float32)

    def read(spec, path, dtype):
        if spec.name == "bad":
            raise AdapterError(f"{path}: broken")
        return torch.ones(spec.num_pages, 4, dtype=dtype)

    loader.read = read
    for spec in specs:
        loader.submit(spec)
    results = []
    while len(results) < 2:
        assert loader.wait(10)
        results += loader.completed()
    by_name = {r.name: r for r in results}
    assert by_name["bad"].pages is None and "broken" in by_name["bad"].error
    assert by_name["good"].error is None and by_name["good"].pages.shape == (4, 4)
    loader.close()
