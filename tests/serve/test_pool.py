import random

import pytest

from lorafleet.errors import ConfigError, EngineError
from lorafleet.serve.kv_cache import KVCacheManager, KVLayout
from lorafleet.serve.pool import ADAPTER, KV, OutOfPages, PagePool


def test_alloc_free_keeps_invariant_under_random_traffic():
    pool, rng, held = PagePool(100), random.Random(0), []
    for _ in range(500):
        if held and rng.random() < 0.5:
            pool.free(held.pop(rng.randrange(len(held))))
        else:
            n = rng.randint(1, 10)
            if pool.can_alloc(n):
                held.append(pool.alloc(n, rng.choice([KV, ADAPTER])))
            else:
                with pytest.raises(OutOfPages):
                    pool.alloc(n, KV)
        pool.check()
        assert pool.num_free + sum(map(len, held)) == 100
        assert len({p for pages in held for p in pages}) == sum(map(len, held))
    for pages in held:
        pool.free(pages)
    pool.check()
    assert pool.num_free == 100 and pool.used_by == {KV: 0, ADAPTER: 0}


def test_double_free_and_bad_size_are_errors():
    pool = PagePool(4)
    pages = pool.alloc(2, KV)
    pool.free(pages)
    with pytest.raises(EngineError, match="freed twice"):
        pool.free(pages)
    with pytest.raises(ConfigError):
        PagePool(0)


def test_kv_layout_packs_gqa_rows():
    # Llama-3-like ratio: kv_dim = H / 4 -> 4 token rows per page.
    layout = KVLayout(num_layers=2, kv_dim=16, page_size=64, block_tokens_hint=6)
    assert layout.rows_per_page == 4
    assert layout.pages_per_group == 2 and layout.block_tokens == 8
    assert layout.pages_per_block == 2 * 2 * 2
    assert layout.pages_for_tokens(1) == 8 and layout.pages_for_tokens(9) == 16
    with pytest.raises(ConfigError, match="larger than the page size"):
        KVLayout(num_layers=1, kv_dim=128, page_size=64)


def test_kv_manager_grows_by_blocks_and_frees():
    pool = PagePool(64)
    kv = KVCacheManager(pool, KVLayout(num_layers=1, kv_dim=32, page_size=64,
                                       block_tokens_hint=4))   # 4 pages per 4-token block
    kv.grow("a", 3)
    assert len(kv.page_ids("a")) == 4 and kv.num_tokens_held("a") == 4
    assert kv.pages_needed("a", 4) == 0 and kv.pages_needed("a", 5) == 4
    kv.grow("a", 5)
    assert pool.used_by[KV] == 8
    assert kv.free("a") == 8 and pool.num_free == 64
    pool.check()
