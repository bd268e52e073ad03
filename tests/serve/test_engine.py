"""The engine against the oracle: every request of a mixed batch (many adapters of mixed ranks
and target sets, base-model rows included) gets exactly the greedy tokens that transformers
produces for that request alone with its adapter merged (peft merge_and_unload), with chunked
prefill (steps mixing decode rows and prompt chunks) and without (all-prefill or all-decode
steps)."""
from __future__ import annotations

import math
import random

import pytest

from lorafleet.errors import AdapterError, RequestError, ShapeError
from lorafleet.serve.engine import Engine, EngineConfig, SamplingParams

from .conftest import merged_oracle, oracle_greedy

# Building 2 x 22 PEFT adapters and their merged oracles takes ~40 s on the 2-core machine.
pytestmark = pytest.mark.slow

MAX_TOKENS = 5
# Scheduling modes: chunked prefill with a budget small enough that prompts are cut and decode
# rows share steps with chunks (26 requests of 2-12 tokens), and the all-or-nothing steps.
MODES = {"chunked": dict(enable_chunked_prefill=True, max_num_batched_tokens=20),
         "whole": dict(enable_chunked_prefill=False)}


def _workload(adapter_names, num_base=4, seed=0):
    """(request id, prompt ids, adapter) for one request per adapter plus some base rows."""
    rng = random.Random(seed)
    names = list(adapter_names) + [None] * num_base
    rng.shuffle(names)
    return [(f"r{i}", [rng.randrange(4, 380) for _ in range(rng.randint(2, 12))], name)
            for i, name in enumerate(names)]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def fleet_with_oracle(request):
    """The fleet plus the oracle's greedy tokens for every request of the workload."""
    base_dir, base_model, adapters = request.getfixturevalue(f"{request.param}_fleet")
    workload = _workload(adapters)
    expected = {}
    merged = {name: merged_oracle(base_model, path) for name, path in adapters.items()}
    for request_id, prompt, name in workload:
        model = base_model if name is None else merged[name]
        expected[request_id] = oracle_greedy(model, prompt, MAX_TOKENS)
    return base_dir, adapters, workload, expected


def _run(engine: Engine, workload, params=None):
    """Add everything, step to the end checking the pool's accounting after every step."""
    params = params or SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    for request_id, prompt, name in workload:
        engine.add_request(request_id, prompt, name, params)
    tokens = {rid: [] for rid in engine.requests}
    finished = {}
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finished[out.request_id] = out
        engine.pool.check()
    assert set(finished) == set(tokens)
    return tokens, finished


def _engine(base_dir, adapters, **config):
    # Loads in the step that asks (no loader thread): which requests are admitted together, and
    # so whether the tiny pool preempts, must not depend on how fast the loader thread runs.
    config.setdefault("async_adapter_loading", False)
    engine = Engine(base_dir, config=EngineConfig(**config))
    for name, path in adapters.items():
        engine.register_adapter(name, path)
    return engine


@pytest.mark.parametrize("mode", MODES)
def test_mixed_batch_matches_merged_oracle(fleet_with_oracle, mode):
    base_dir, adapters, workload, expected = fleet_with_oracle
    engine = _engine(base_dir, adapters, num_pages=8192, block_tokens=4, **MODES[mode])
    engine.step_log = []
    tokens, finished = _run(engine, workload)
    assert tokens == expected
    assert all(out.finish_reason == "length" for out in finished.values())
    stats = engine.stats()
    assert stats["pages_free"] == stats["pages_total"] - stats["pages_adapter"]
    assert stats["pages_kv"] == 0 and stats["running"] == 0 and stats["queue_depth"] == 0
    if mode == "chunked":
        assert any(r.num_decode_seqs and r.num_prefill_tokens for r in engine.step_log)
        assert max(r.num_tokens for r in engine.step_log) <= 20
    else:
        assert all(r.num_decode_seqs == 0 or r.num_prefill_tokens == 0 for r in engine.step_log)
    # The adapters matter: serving the same prompts on the bare base changes most outputs.
    engine_base = _engine(base_dir, {}, num_pages=8192, block_tokens=4)
    base_tokens, _ = _run(engine_base, [(rid, p, None) for rid, p, _ in workload])
    changed = sum(base_tokens[rid] != expected[rid] for rid, _, name in workload if name)
    assert changed >= len(adapters) * 3 // 4


def test_torch_paths_match_merged_oracle(fleet_with_oracle, monkeypatch):
    """With the C kernels switched off (the SGMV LoRA kernel and paged decode attention), the
    plain PyTorch twins serve the same tokens: gathered adapter stacks, gathered K/V."""
    monkeypatch.setenv("LORAFLEET_SGMV_KERNEL", "0")
    monkeypatch.setenv("LORAFLEET_ATTENTION_KERNEL", "0")
    base_dir, adapters, workload, expected = fleet_with_oracle
    engine = _engine(base_dir, adapters, num_pages=8192, block_tokens=4)
    assert engine.runner._lora_builder.kernel is None
    tokens, _ = _run(engine, workload)
    assert tokens == expected
    assert engine.runner._lora_builder.gathers > 0


@pytest.mark.parametrize("mode", MODES)
def test_tiny_pool_evicts_and_preempts_same_tokens(fleet_with_oracle, mode):
    base_dir, adapters, workload, expected = fleet_with_oracle
    # Size the pool to the largest single request (+25%): the minimum add_request allows.
    engine = _engine(base_dir, adapters, num_pages=8192, block_tokens=4)
    need = max(engine.kv.layout.pages_for_tokens(len(p) + MAX_TOKENS)
               + (engine.cache.host[n].num_pages if n else 0) for _, p, n in workload)
    engine = _engine(base_dir, adapters, num_pages=need + need // 4, block_tokens=4,
                     **MODES[mode])
    tokens, _ = _run(engine, workload)
    assert tokens == expected
    stats = engine.stats()
    assert stats["cache_evictions"] > 0 and stats["preemptions"] > 0, stats
    engine.cache.reclaim(engine.pool.num_pages)
    assert engine.pool.num_free == engine.pool.num_pages


@pytest.mark.parametrize("mode", MODES)
def test_adapter_cap_per_step_same_tokens(fleet_with_oracle, mode):
    base_dir, adapters, workload, expected = fleet_with_oracle
    engine = _engine(base_dir, adapters, num_pages=8192, block_tokens=4,
                     max_adapters_per_step=3, max_num_seqs=8, **MODES[mode])
    tokens, _ = _run(engine, workload[:12])
    assert tokens == {rid: expected[rid] for rid, _, _ in workload[:12]}


@pytest.mark.parametrize("chunked", [True, False])
def test_long_prompts_are_chunked_beside_decode_rows(small_fleet, chunked):
    """Prompts up to 4x max_num_batched_tokens arrive while other requests decode: with chunked
    prefill each prompt runs over several steps that also carry the decode rows, the decoding
    requests get a token on every step (no stall), and every output equals the oracle's."""
    base_dir, base_model, adapter_paths = small_fleet
    budget, max_tokens = 16, 8
    rng = random.Random(3)
    names = [None, *adapter_paths]
    early = [(f"e{i}", [rng.randrange(4, 380) for _ in range(rng.randint(3, 9))], name)
             for i, name in enumerate(names[:3])]
    late = [(f"l{i}", [rng.randrange(4, 380) for _ in range(rng.randint(20, 4 * budget))], name)
            for i, name in enumerate(names)]
    merged = {name: merged_oracle(base_model, path) for name, path in adapter_paths.items()}
    expected = {rid: oracle_greedy(base_model if name is None else merged[name], prompt,
                                   max_tokens) for rid, prompt, name in early + late}
    engine = _engine(base_dir, adapter_paths, num_pages=4096, block_tokens=4,
                     max_num_batched_tokens=budget, enable_chunked_prefill=chunked)
    engine.step_log = []
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for rid, prompt, name in early:
        engine.add_request(rid, prompt, name, params)
    tokens, token_steps = {}, {}
    step = 0
    while engine.has_work():
        if step == 2:                            # the early ones are decoding by now
            for rid, prompt, name in late:
                engine.add_request(rid, prompt, name, params)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            token_steps.setdefault(out.request_id, []).extend([step] * len(out.new_token_ids))
        engine.pool.check()
        step += 1
    assert tokens == expected
    log = engine.step_log
    # A late prompt's first token comes no earlier than its last chunk can have run.
    for rid, prompt, _ in late:
        chunks = math.ceil(len(prompt) / budget) if chunked else 1
        assert token_steps[rid][0] >= 2 + chunks - 1
    stalls = sum(b - a - 1 for steps in token_steps.values() for a, b in zip(steps, steps[1:]))
    if chunked:
        assert all(r.num_tokens <= budget for r in log)
        assert any(r.num_decode_seqs and r.num_prefill_tokens for r in log)
        assert sum(r.num_prefill_tokens for r in log) == sum(len(p) for _, p, _ in early + late)
        assert stalls == 0
        assert max(token_steps[f"l{i}"][0] for i in range(len(late))) >= 2 + 4
    else:
        assert all(r.num_decode_seqs == 0 or r.num_prefill_tokens == 0 for r in log)
        assert stalls > 0          # the decode rows waited for the prefill steps


def test_abort_frees_pages_at_once(llama_fleet):
    base_dir, _, adapters = llama_fleet
    engine = _engine(base_dir, dict(list(adapters.items())[:3]), num_pages=4096,
                     block_tokens=4)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    engine.add_request("a", [5, 6, 7], "a00", params)
    engine.add_request("b", [8, 9], None, params)
    engine.add_request("c", [10, 11, 12, 13], "a01", params)
    engine.step()
    # Adapters are read on the loader thread: step until both adapter requests run.
    while any(engine.requests[r].status.value != "running" for r in "abc"):
        engine.step()
    engine.step()
    kv_before = engine.pool.used_by["kv"]
    assert engine.abort("a")
    assert engine.pool.used_by["kv"] < kv_before
    assert engine.cache.refcount.get("a00", 0) == 0
    engine.pool.check()
    assert not engine.abort("nope")
    outs = engine.step()
    aborted = [o for o in outs if o.request_id == "a"]
    assert aborted and aborted[0].finished and aborted[0].finish_reason == "abort"
    while engine.has_work():
        engine.step()
    assert engine.pool.used_by["kv"] == 0 and engine.pool.check() is None


def test_bad_requests_get_errors_engine_keeps_serving(llama_fleet, gpt2_fleet):
    base_dir, base_model, adapters = llama_fleet
    engine = _engine(base_dir, {"good": adapters["a00"]}, num_pages=64, block_tokens=4,
                     max_lora_rank=8, max_model_len=40)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    engine.add_request("ok1", [5, 6, 7], "good", params)
    with pytest.raises(RequestError, match="unknown adapter 'missing'"):
        engine.add_request("x1", [5, 6], "missing", params)
    with pytest.raises(RequestError, match="context is 40"):
        engine.add_request("x2", list(range(5, 50)), None, params)
    with pytest.raises(RequestError, match="pool has 64"):
        engine.add_request("x3", list(range(5, 35)), "good", SamplingParams(max_tokens=9))
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("x4", [], None, params)
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("ok1", [5], None, params)
    with pytest.raises(AdapterError, match="rank 16 is larger than the engine's max_lora_rank 8"):
        engine.register_adapter("big", adapters["a04"])           # rank 16
    with pytest.raises(AdapterError, match="not a projection of the base model"):
        engine.register_adapter("gpt2_adapter", gpt2_fleet[2]["a00"])
    from lorafleet.lora.peft_format import read_adapter
    config, tensors = read_adapter(adapters["a00"])
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = tensors[key][:, :10]
    with pytest.raises(ShapeError, match="expected lora_A"):
        engine.register_adapter_tensors("bad_shape", config, tensors)
    assert engine.adapters() == ["good"]
    engine.add_request("ok2", [8, 9], None, params)
    tokens, finished = _run(engine, [])
    assert sorted(finished) == ["ok1", "ok2"]
    assert all(len(t) == 4 and finished[r].error is None for r, t in tokens.items())
    assert engine.pool.used_by["kv"] == 0
