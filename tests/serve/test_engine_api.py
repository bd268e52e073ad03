"""The engine's request-level features: text and stop strings, EOS, logprobs, seeds, the
asyncio interface, stats."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from lorafleet.serve import AsyncEngine, Engine, EngineConfig, SamplingParams

from .conftest import merged_oracle


@pytest.fixture(scope="module")
def engine(small_fleet):
    base_dir, _, adapters = small_fleet
    engine = Engine(base_dir, config=EngineConfig(num_pages=4096, block_tokens=4))
    for name in ("a00", "a01", "a03"):
        engine.register_adapter(name, adapters[name])
    return engine


def test_text_streaming_and_stop_strings(engine):
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    full = engine.generate(["the quick brown"], ["a01"], params)[0]
    assert full.text == engine.tokenizer.decode(full.token_ids) and len(full.text) > 3
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    cut = full.text.find(stop)
    engine.add_request("s", "the quick brown", "a01",
                       SamplingParams(max_tokens=12, ignore_eos=True, stop=[stop]))
    pieces, last = [], None
    while engine.has_work():
        for out in engine.step():
            pieces.append(out.new_text)
            last = out
    assert last.finished and last.finish_reason == "stop"
    assert "".join(pieces) == full.text[:cut]
    engine.pool.check()


def test_eos_ends_without_the_eos_token(engine):
    first = engine.generate([[5, 6, 7]], ["a00"], SamplingParams(max_tokens=3,
                                                                 ignore_eos=True))[0]
    saved = engine.eos_ids
    engine.eos_ids = {first.token_ids[1]}
    try:
        out = engine.generate([[5, 6, 7]], ["a00"], SamplingParams(max_tokens=3))[0]
    finally:
        engine.eos_ids = saved
    assert out.finish_reason == "stop" and out.token_ids == first.token_ids[:1]


def test_logprobs_match_oracle(engine, small_fleet):
    _, base_model, adapters = small_fleet
    prompt = [9, 10, 11, 12]
    out = engine.generate([prompt], ["a03"], SamplingParams(max_tokens=4, ignore_eos=True,
                                                            logprobs=True))[0]
    oracle = merged_oracle(base_model, adapters["a03"])
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logp = oracle(ids).logits[0].log_softmax(-1)
    expected = [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(expected, abs=1e-4)


def test_top_logprobs_match_oracle_topk(engine, small_fleet):
    """One batch mixing a greedy request with 5 alternatives, a hot sampled one with 1 (its
    tokens are mostly not the likeliest: the chosen one comes on top), one with the chosen
    token's logprob only and one without logprobs. Alternatives equal the oracle's
    log_softmax(logits).topk, the chosen token's entry its logprob."""
    _, base_model, adapters = small_fleet
    requests = [([9, 10, 11, 12], "a03", SamplingParams(logprobs=True, top_logprobs=5)),
                ([5, 6, 7], "a01", SamplingParams(temperature=5.0, seed=3, logprobs=True,
                                                  top_logprobs=1)),
                ([8, 9], None, SamplingParams(logprobs=True)),
                ([8, 9, 10], "a00", SamplingParams())]
    params = [SamplingParams(**{**vars(p), "max_tokens": 6, "ignore_eos": True})
              for _, _, p in requests]
    outs = engine.generate([r[0] for r in requests], [r[1] for r in requests], params)
    assert outs[3].logprobs is None
    assert all(isinstance(v, float) for v in outs[2].logprobs)
    outside_top = 0
    for (prompt, adapter, _), p, out in zip(requests, params, outs):
        if not p.logprobs:
            continue
        oracle = base_model if adapter is None else merged_oracle(base_model, adapters[adapter])
        with torch.no_grad():
            logp = torch.log_softmax(oracle(torch.tensor([prompt + out.token_ids])).logits[0],
                                     dim=-1)
        assert len(out.logprobs) == len(out.token_ids) == 6
        for i, (token, got) in enumerate(zip(out.token_ids, out.logprobs)):
            row = logp[len(prompt) - 1 + i]
            chosen = got[token] if p.top_logprobs else got
            assert chosen == pytest.approx(row[token].item(), abs=1e-4)
            if not p.top_logprobs:
                continue
            top = row.topk(p.top_logprobs)
            alternatives = sorted(got.items(), key=lambda kv: -kv[1])[:p.top_logprobs]
            assert [t for t, _ in alternatives] == top.indices.tolist()
            assert [v for _, v in alternatives] == pytest.approx(top.values.tolist(), abs=1e-4)
            expected_keys = set(top.indices.tolist()) | {token}
            assert set(got) == expected_keys
            outside_top += len(got) > p.top_logprobs
    assert outside_top >= 3         # the hot request tested the chosen-not-in-top case


def test_no_logprobs_computed_unless_asked(engine, monkeypatch):
    from lorafleet.errors import RequestError
    from lorafleet.serve import logits as logits_module   # where the engine's logprobs are made

    def fail(*args):
        raise AssertionError("logprobs computed for a batch that asked for none")

    monkeypatch.setattr(logits_module, "token_and_top_logprobs", fail)
    out = engine.generate([[5, 6, 7], [8, 9]], ["a00", None],
                          SamplingParams(max_tokens=3, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [3, 3] and out[0].logprobs is None
    with pytest.raises(RequestError, match=r"top_logprobs must be in \[0, 20\], got 21"):
        SamplingParams(logprobs=True, top_logprobs=21)
    with pytest.raises(RequestError, match="top_logprobs needs logprobs=True"):
        SamplingParams(top_logprobs=2)


def test_seeded_sampling_is_reproducible(engine):
    params = [SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=s,
                             ignore_eos=True) for s in (1, 1, 2)]
    first = engine.generate([[5, 6]] * 3, ["a00", "a00", "a00"], params)
    again = engine.generate([[5, 6]], ["a00"], params[0])[0]
    assert first[0].token_ids == first[1].token_ids == again.token_ids
    assert first[0].token_ids != first[2].token_ids


def test_async_stream_abort_and_shutdown(engine):
    expected = engine.generate([[5, 6, 7], [8, 9]], ["a00", None],
                               SamplingParams(max_tokens=6, ignore_eos=True))

    async def main():
        async_engine = AsyncEngine(engine)

        async def collect(rid, prompt, adapter, limit=None):
            tokens = []
            async for out in async_engine.stream(rid, prompt, adapter,
                                                 SamplingParams(max_tokens=6, ignore_eos=True)):
                tokens += out.new_token_ids
                if limit and len(tokens) >= limit:
                    break                     # leaving early aborts the request
            return tokens

        got = await asyncio.gather(collect("x", [5, 6, 7], "a00"), collect("y", [8, 9], None),
                                   collect("z", [8, 9, 10], "a01", limit=1))
        with pytest.raises(Exception, match="unknown adapter"):
            await collect("bad", [5], "nope")
        await async_engine.shutdown(drain=True)
        return got

    got = asyncio.run(main())
    assert got[0] == expected[0].token_ids and got[1] == expected[1].token_ids
    assert len(got[2]) >= 1
    assert engine.pool.used_by["kv"] == 0 and not engine.requests
    stats = engine.stats()
    assert {"pages_kv", "pages_adapter", "queue_depth", "running", "cache_hits",
            "cache_misses", "cache_evictions"} <= set(stats)


def test_adapter_store_registers_a_folder_of_folders(small_fleet, tmp_path):
    from lorafleet.adapters.store import AdapterStore
    from lorafleet.errors import AdapterError

    base_dir, _, adapters = small_fleet
    store = AdapterStore(tmp_path / "store", create=True)
    store.add("sql", adapters["a00"])
    store.add("chat.v2", adapters["a01"])
    with pytest.raises(AdapterError, match="already exists"):
        store.add("sql", adapters["a02"])
    with pytest.raises(AdapterError, match="must be"):
        store.add("../evil", adapters["a02"])
    with pytest.raises(AdapterError, match="missing adapter_config.json"):
        store.add("empty", tmp_path)
    assert store.names() == ["chat.v2", "sql"] and "sql" in store
    engine = Engine(base_dir, config=EngineConfig(num_pages=1024, block_tokens=4))
    assert engine.register_store(store.root) == ["chat.v2", "sql"]
    assert engine.adapters() == ["chat.v2", "sql"]
    out = engine.generate([[5, 6]], ["sql"], SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(out[0].token_ids) == 2
    engine.unregister_adapter("sql")
    store.remove("sql")
    assert store.names() == ["chat.v2"] and engine.adapters() == ["chat.v2"]


def test_stream_cancelled_while_adding_still_aborts(engine, monkeypatch):
    """A stream cancelled while its add_request waits in the worker thread (for the engine's
    lock) must abort the request once it has been added, not before (an abort that comes
    first finds nothing, and the request then runs on with no reader)."""
    gate, aborts = threading.Event(), []
    real_add, real_abort = engine.add_request, engine.abort

    def slow_add(*args, **kwargs):
        gate.wait(10)
        real_add(*args, **kwargs)

    def recorded_abort(request_id):
        aborts.append(real_abort(request_id))
        return aborts[-1]

    monkeypatch.setattr(engine, "add_request", slow_add)
    monkeypatch.setattr(engine, "abort", recorded_abort)

    async def main():
        async_engine = AsyncEngine(engine)

        async def consume():
            async for _ in async_engine.stream("late", [5, 6, 7], None,
                                               SamplingParams(max_tokens=40, ignore_eos=True)):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await async_engine.shutdown(drain=True)

    asyncio.run(main())
    assert aborts == [True]                  # aborted once, after the request was in
    assert engine.pool.used_by["kv"] == 0 and not engine.requests


def test_queued_requests_adapters_are_prefetched(small_fleet):
    """With one request running at a time, the adapter of the request queued behind it is read
    on the loader thread while the first runs, then written into free pages (a prefetch:
    resident, unreferenced), so its admission is a hit."""
    base_dir, _, adapters = small_fleet
    engine = Engine(base_dir, config=EngineConfig(num_pages=1024, block_tokens=4,
                                                  max_num_seqs=1))
    for name in ("a00", "a01", "a02"):
        engine.register_adapter(name, adapters[name])
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    for i, name in enumerate(("a00", "a01", "a02")):
        engine.add_request(f"r{i}", [5 + i, 6, 7], name, params)
    outputs = {}

    def step():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)

    cache = engine.cache
    while engine.requests["r0"].status.value != "running":
        step()
    assert cache.refcount == {"a00": 1} and cache.misses == 1
    while "a01" not in cache.resident:   # its read started at the first step
        cache.loader.wait(1)
        step()
    assert list(cache.resident) == ["a00", "a01"] and cache.prefetches >= 1
    assert engine.requests["r0"].status.value == "running"      # 6 tokens: still decoding
    while engine.requests["r1"].status.value != "running":
        step()
    assert cache.refcount == {"a01": 1} and cache.misses == 1 and cache.hits == 1
    while engine.has_work():
        step()
    assert cache.misses + cache.prefetches == 3 and cache.loads == 3
    # The prefetched adapters give the same tokens as an engine that loads them on admission.
    fresh = Engine(base_dir, config=EngineConfig(num_pages=1024, block_tokens=4))
    for name in ("a01", "a02"):
        fresh.register_adapter(name, adapters[name])
    for i, name in ((1, "a01"), (2, "a02")):
        assert fresh.generate([[5 + i, 6, 7]], [name], params)[0].token_ids == outputs[f"r{i}"]
