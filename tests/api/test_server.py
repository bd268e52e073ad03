"""The OpenAI-compatible server, driven over real HTTP with the official `openai` client."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

PROMPTS = ["the quick brown fox", "to be or not to be"]


def expected_text(tokenizer, reference, prompt_ids, adapter, max_tokens):
    ids = reference(prompt_ids, adapter, max_tokens)
    return tokenizer.decode([t for t in ids if t != tokenizer.eos_token_id]), ids


def test_models_list_base_and_adapters(client, server):
    models = {m.id: m for m in client.models.list().data}
    # registered adapters, and gamma: a folder of --adapter-dir, resolvable on demand
    assert {"base", "alpha", "beta", "gamma"} <= set(models)
    assert all((server.adapter_dir / m).is_dir() for m in set(models) - {"base"})
    assert models["alpha"].parent == "base" and models["beta"].parent == "base"
    assert getattr(models["base"], "parent", None) is None


@pytest.mark.parametrize("model", ["base", "alpha", "beta"])
def test_completion_greedy_matches_reference(client, tokenizer, reference, model):
    adapter = None if model == "base" else model
    for prompt in PROMPTS:
        prompt_ids = tokenizer.encode(prompt)
        text, ids = expected_text(tokenizer, reference, prompt_ids, adapter, 8)
        resp = client.completions.create(model=model, prompt=prompt, max_tokens=8,
                                         temperature=0)
        assert resp.choices[0].text == text
        assert resp.usage.prompt_tokens == len(prompt_ids)
        assert resp.usage.completion_tokens == len(ids)
        assert resp.usage.total_tokens == len(prompt_ids) + len(ids)
        assert resp.choices[0].finish_reason == ("length" if len(ids) == 8 else "stop")
        assert text  # the test is blind if everything is EOS


def test_adapters_change_the_output(client):
    texts = {m: client.completions.create(model=m, prompt=PROMPTS[0], max_tokens=8,
                                          temperature=0).choices[0].text
             for m in ("base", "alpha", "beta")}
    assert len(set(texts.values())) == 3, texts


def test_streaming_completion_equals_non_streaming(client, http):
    full = client.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=10,
                                     temperature=0)
    chunks = list(client.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=10,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    # the raw SSE framing: every event is `data: ...`, the last is `data: [DONE]`
    with http.stream("POST", "/v1/completions", json={
            "model": "alpha", "prompt": PROMPTS[1], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2][len("data: "):])["usage"]
    assert usage["completion_tokens"] >= 1


def test_chat_uses_template_and_matches_reference(client, tokenizer, reference):
    messages = [{"role": "system", "content": "name : the eagle"},
                {"role": "user", "content": "food : french"}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=True)
    text, ids = expected_text(tokenizer, reference, prompt_ids, "beta", 8)
    resp = client.chat.completions.create(model="beta", messages=messages, max_tokens=8,
                                          temperature=0)
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == text
    assert resp.usage.prompt_tokens == len(prompt_ids)
    stream = client.chat.completions.create(model="beta", messages=messages, max_tokens=8,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_n_choices_seed_and_logprobs(client):
    resp = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=5, n=3,
                                     temperature=0, logprobs=1)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert len({c.text for c in resp.choices}) == 1  # greedy: all choices equal
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == resp.usage.completion_tokens // 3
    assert all(v <= 0 for v in lp.token_logprobs)
    assert "".join(lp.tokens) == resp.choices[0].text
    sampled = [client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=6,
                                         temperature=1.0, seed=7).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # same seed, same sample
    chat = client.chat.completions.create(model="base", messages=[{"role": "user",
                                                                    "content": "hi"}],
                                          max_tokens=3, temperature=0, logprobs=True)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens


def test_stop_sequence(client):
    full = client.completions.create(model="beta", prompt=PROMPTS[0], max_tokens=12,
                                     temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full
    resp = client.completions.create(model="beta", prompt=PROMPTS[0], max_tokens=12,
                                     temperature=0, stop=[stop])
    assert resp.choices[0].finish_reason == "stop"
    assert stop not in resp.choices[0].text
    assert full.startswith(resp.choices[0].text)


def test_metrics_exposed(client, http):
    client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=2)
    body = http.get("/metrics").text
    assert 'lorafleet_requests_total{adapter="alpha",endpoint="completions",status="ok"}' in body
    assert 'lorafleet_completion_tokens_total{adapter="alpha"}' in body
    assert "lorafleet_request_latency_seconds_bucket" in body
    assert "lorafleet_time_to_first_token_seconds_count" in body
    for name in ("lorafleet_queue_depth", "lorafleet_running_batch_size",
                 "lorafleet_pool_pages_kv", "lorafleet_pool_pages_adapters",
                 "lorafleet_adapter_cache_hits_total", "lorafleet_adapter_cache_misses_total",
                 "lorafleet_adapter_cache_evictions_total"):
        assert f"\n{name} " in body, name
    assert http.get("/health").json() == {"status": "ok"}


def test_echo_and_streamed_n_choices(client):
    plain = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=4,
                                      temperature=0).choices[0].text
    echoed = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=4,
                                       temperature=0, echo=True).choices[0].text
    assert echoed == PROMPTS[0] + plain
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=4,
                                           temperature=0, n=2, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finished.add(choice.index)
    assert texts == {0: plain, 1: plain} and finished == {0, 1}
