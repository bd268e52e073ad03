"""The step's LoRA batch (lora_batch.py): through a random sequence of batches (adapters joining,
leaving, evicted and reloaded, re-registered), every module's stacked rows of every adapter in the
batch equal that adapter's A and B^T read straight from its pool pages (the reference gather),
and segments cover exactly the rows whose adapter targets the module."""
import random

import torch

from lorafleet.serve.adapter_cache import AdapterCache, build_host_adapter
from lorafleet.serve.lora_batch import LoraBatchBuilder, gather_module_reference
from lorafleet.serve.pool import PagePool

H = 16
TARGETS = {"q": (16, 16), "k": (16, 8), "wide": (40, 16)}   # wide: A rows span 3 pages


def make_adapter(name, seed, rank, modules):
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in modules:
        fan_in, fan_out = TARGETS[m]
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen)
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(fan_out, rank,
                                                                     generator=gen)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank}
    return build_host_adapter(name, config, tensors, TARGETS, H, 64, torch.float32)


def test_stacks_match_the_pool_through_joins_leaves_and_reloads():
    rng = random.Random(0)
    pool = PagePool(2000)
    pages = torch.zeros(2000, H)

    def write(ids, data):
        pages[torch.tensor(ids)] = data

    cache = AdapterCache(pool, write)
    names = [f"a{i}" for i in range(12)]
    for i, name in enumerate(names):
        mods = [["q"], ["q", "k"], ["k", "wide"], ["q", "k", "wide"]][i % 4]
        cache.register(make_adapter(name, i, [2, 4, 8][i % 3], mods))
    builder = LoraBatchBuilder(pages, cache)
    for step in range(60):
        if step == 30:                      # re-register a0 with new weights, same name
            cache.unregister("a0")
            cache.register(make_adapter("a0", 99, 4, ["q", "k"]))
        chosen = rng.sample(names, rng.randint(1, 6))
        for name in chosen:
            assert cache.pin(name)
        runs = [(None, rng.randint(0, 2))] + [(n, rng.randint(1, 3)) for n in sorted(chosen)]
        runs = [(n, k) for n, k in runs if k]
        batch = builder.build(runs)
        row_of, row = {}, 0
        for name, n in runs:
            row_of[name] = (row, row + n)
            row += n
        for module in TARGETS:
            users = [n for n in chosen if module in cache.host[n].modules]
            lora = batch.modules.get(module)
            if not users:
                assert lora is None
                continue
            assert len(lora.segments) == len(users)
            for seg in lora.segments:
                name = next(n for n in users if row_of[n] == (seg.row_start, seg.row_end))
                s = cache.host[name].modules[module]
                a, bt = gather_module_reference(pages, cache.resident[name], s)
                rows = slice(seg.rank_start, seg.rank_start + seg.rank)
                assert seg.rank == s.rank and seg.scaling == s.scaling
                torch.testing.assert_close(lora.a[rows], a, rtol=0, atol=0)
                torch.testing.assert_close(lora.bt[rows], bt, rtol=0, atol=0)
        for name in chosen:
            cache.unpin(name)
        if step % 7 == 6:                   # evict everything: reloads land on other pages
            cache.reclaim(pool.num_pages)
            pool.check()
    assert 0 < builder.gathers <= 60        # at most one gather per new adapter set


def test_reference_gather_reads_the_adapter_weights():
    pool, pages = PagePool(200), torch.zeros(200, H)
    cache = AdapterCache(pool, lambda ids, data: pages.index_copy_(0, torch.tensor(ids), data))
    cache.register(make_adapter("x", 5, 3, ["q", "wide"]))
    assert cache.pin("x")
    gen = torch.Generator().manual_seed(5)
    for m in ("q", "wide"):                 # make_adapter's draw order
        fan_in, fan_out = TARGETS[m]
        a, b = torch.randn(3, fan_in, generator=gen), torch.randn(fan_out, 3, generator=gen)
        got_a, got_bt = gather_module_reference(pages, cache.resident["x"],
                                                cache.host["x"].modules[m])
        torch.testing.assert_close(got_a, a)
        torch.testing.assert_close(got_bt, b.t())
