"""A request can only hurt itself (issue 13): hostile rows (an adapter whose weights overflow to
NaN/Inf, temperature 1e-40, top_k 2**63, huge seeds) mixed into a batch of ordinary requests.
Each ordinary request must produce exactly what it produces in a clean run, the hostile rows
fail alone with a clear error (or finish), and the pool ends all free."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from lorafleet.models.sampling import MIN_TEMPERATURE, SamplingParams
from lorafleet.serve import Engine, EngineConfig

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [20, 21], [30, 31, 32, 33]]
CLEAN_ADAPTERS = [None, "a00", "a01"]
MAX_TOKENS = 5


@pytest.fixture(scope="module")
def engine(small_fleet):
    base_dir, _, adapters = small_fleet
    engine = Engine(base_dir, config=EngineConfig(num_pages=4096, block_tokens=4))
    for name in ("a00", "a01"):
        engine.register_adapter(name, adapters[name])
    # Finite weights, so any load-time check of finiteness passes; 1e30 overflows float32 in
    # the forward pass, which is what a NaN or Inf adapter does to the logits.
    config = json.loads((adapters["a02"] / "adapter_config.json").read_text())
    tensors = load_file(adapters["a02"] / "adapter_model.safetensors")
    engine.register_adapter_tensors("overflow", config,
                                    {k: v * 1e30 for k, v in tensors.items()})
    return engine


def run(engine, requests) -> dict[str, object]:
    """requests: (id, prompt, adapter, params) -> {id: final RequestOutput-like summary}."""
    for request_id, prompt, adapter, params in requests:
        engine.add_request(request_id, prompt, adapter, params)
    results: dict[str, dict] = {r[0]: {"ids": [], "error": None, "reason": None}
                                for r in requests}
    while engine.has_work():
        for out in engine.step():
            result = results[out.request_id]
            result["ids"] += out.new_token_ids
            if out.finished:
                result["reason"], result["error"] = out.finish_reason, out.error
    return results


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)


HOSTILE = {
    "overflow-adapter": ("overflow", lambda: greedy()),
    "overflow-adapter-logprobs": ("overflow", lambda: SamplingParams(
        max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=True, top_logprobs=3)),
    "overflow-adapter-sampled": ("overflow", lambda: SamplingParams(
        max_tokens=MAX_TOKENS, temperature=1.0, seed=1, ignore_eos=True)),
    "tiny-temperature": (None, lambda: SamplingParams(max_tokens=MAX_TOKENS, temperature=1e-40,
                                                      seed=2, ignore_eos=True)),
    "huge-top-k": ("a00", lambda: SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0,
                                                 top_k=2**63, seed=3, ignore_eos=True)),
    "edge-seed": ("a01", lambda: SamplingParams(max_tokens=MAX_TOKENS, temperature=2.0,
                                                seed=2**64 - 1, ignore_eos=True)),
}


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(clean=st.lists(st.tuples(st.sampled_from(range(len(PROMPTS))),
                                st.sampled_from(CLEAN_ADAPTERS)), min_size=1, max_size=4),
       hostile=st.lists(st.tuples(st.sampled_from(sorted(HOSTILE)),
                                  st.sampled_from(range(len(PROMPTS)))), min_size=1, max_size=3),
       order=st.randoms(use_true_random=False))
def test_hostile_rows_do_not_change_other_requests(engine, clean, hostile, order):
    clean_requests = [(f"c{i}", PROMPTS[p], adapter, greedy())
                      for i, (p, adapter) in enumerate(clean)]
    alone = run(engine, clean_requests)
    hostile_requests = []
    for j, (kind, p) in enumerate(hostile):
        adapter, params = HOSTILE[kind]
        hostile_requests.append((f"h{j}-{kind}", PROMPTS[p], adapter, params()))
    mixed_requests = clean_requests + hostile_requests
    order.shuffle(mixed_requests)
    mixed = run(engine, mixed_requests)
    for request_id, expected in alone.items():
        assert expected["error"] is None and len(expected["ids"]) == MAX_TOKENS
        assert mixed[request_id] == expected, request_id
    for request_id, result in mixed.items():
        if "overflow-adapter" in request_id:
            assert result["reason"] == "error"
            assert "non-finite logits" in result["error"] and "'overflow'" in result["error"]
        elif request_id.startswith("h"):
            assert result["error"] is None and len(result["ids"]) == MAX_TOKENS, result
    assert not engine.requests
    assert engine.stats()["pages_kv"] == 0
    engine.pool.check()


def test_sampling_params_validate_and_clamp():
    assert SamplingParams(temperature=1e-40).temperature == MIN_TEMPERATURE
    assert SamplingParams(top_k=2**63).top_k == 0 and SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop="ab").stop == ["ab"]
    from lorafleet.errors import ConfigError, RequestError, SamplingError
    bad = [dict(stop=[""]), dict(stop=["a", 3]), dict(seed=2**64), dict(seed=-(2**63) - 1),
           dict(max_tokens=True), dict(max_tokens=0), dict(temperature=float("nan")),
           dict(temperature=float("inf")), dict(temperature=-1), dict(top_p=0),
           dict(top_p=1.5), dict(top_k=-2), dict(top_k=1.5), dict(logprobs=1),
           dict(top_logprobs=21, logprobs=True), dict(top_logprobs=2)]
    for kwargs in bad:
        with pytest.raises(SamplingError) as info:
            SamplingParams(**kwargs)
        # an engine caller sees a RequestError, a generate() caller a ConfigError
        assert isinstance(info.value, RequestError) and isinstance(info.value, ConfigError)
        assert next(iter(kwargs)) in str(info.value), kwargs


def test_stop_string_is_one_stop_not_characters(engine):
    full = engine.generate([PROMPTS[0]], [None], greedy())[0]
    text = full.text
    two = text[1:3]
    assert len(two) == 2
    cut = engine.generate([PROMPTS[0]], [None], SamplingParams(
        max_tokens=MAX_TOKENS, ignore_eos=True, stop=two))[0]
    assert cut.text == text[:text.find(two)]
