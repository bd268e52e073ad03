"""The step's LoRA batch (lora_batch.py): through a random sequence of batches (adapters joining,
leaving, evicted and reloaded, re-registered), every module's page table names, for every
adapter in the batch, exactly that adapter's A and B^T as read straight from its pool pages (the
reference gather), and segments cover exactly the rows whose adapter targets the module. The
batch's kernel (the C kernel, or the torch fallback where there is none) then computes what the
paged reference does."""
import random

import pytest
import torch

from lorafleet.serve.adapter_cache import AdapterCache, build_host_adapter
from lorafleet.serve.lora_batch import LoraBatchBuilder, gather_module_reference, paged_kernel
from lorafleet.serve.lora_ops import lora_delta_paged_reference, paged_weights
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


def segments_of(lora, pages) -> list[tuple]:
    """(row_start, row_end, rank, scaling, A, B^T) of each segment of one module's batch, read
    through the page table (rank 0: the segment's adapter does not adapt this module)."""
    return [(*(int(v) for v in lora.seg_rows[s]), int(lora.seg_rank[s]),
             paged_weights(pages, lora, s)[2], *paged_weights(pages, lora, s)[:2])
            for s in range(lora.seg_rank.shape[0]) if lora.seg_rank[s] > 0]


@pytest.mark.parametrize("paged", [False, True], ids=["torch", "kernel"])
def test_weights_match_the_pool_through_joins_leaves_and_reloads(paged):
    if paged and paged_kernel(torch.zeros(1, H)) is None:
        pytest.skip("no paged kernel on this machine (no C compiler)")
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
    builder = LoraBatchBuilder(pages, cache, TARGETS, kernel="auto" if paged else None)
    assert (builder.kernel is not None) == paged
    kernel_calls = 0
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
            segments = segments_of(lora, pages)
            assert len(segments) == len(users)
            for row_start, row_end, rank, scaling, got_a, got_bt in segments:
                name = next(n for n in users if row_of[n] == (row_start, row_end))
                s = cache.host[name].modules[module]
                a, bt = gather_module_reference(pages, cache.resident[name], s)
                assert rank == s.rank and scaling == pytest.approx(s.scaling)
                torch.testing.assert_close(got_a, a, rtol=0, atol=0)
                torch.testing.assert_close(got_bt, bt, rtol=0, atol=0)
            # and the kernel computes what the weights say
            fan_in, fan_out = TARGETS[module]
            x, y = torch.randn(row, fan_in), torch.randn(row, fan_out)
            expected = y.clone()
            lora_delta_paged_reference(expected, x, pages, lora)
            batch.kernel(y, x, batch.pages, lora)
            kernel_calls += 1
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        for name in chosen:
            cache.unpin(name)
        if step % 7 == 6:                   # evict everything: reloads land on other pages
            cache.reclaim(pool.num_pages)
            pool.check()
    # the kernel reads the weights in place; the torch fallback copies them out on each call
    assert builder.gathers == (0 if paged else kernel_calls) and kernel_calls > 0


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
