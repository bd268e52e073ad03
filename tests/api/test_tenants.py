"""Tenants over real HTTP (issues 12 and 13): per-key limits from the keys file (429 with
Retry-After), a flooding key that cannot slow another key's requests past a stated bound, and
adapters served on demand from --adapter-dir, with the official `openai` client."""
from __future__ import annotations

import logging
import shutil
import statistics
import threading
import time

import httpx
import openai
import pytest

from lorafleet.api.auth import key_id

from .conftest import serving

log = logging.getLogger(__name__)

KEYS = {
    "sk-admin": "*",
    "sk-flood": {"adapters": ["alpha"], "max_concurrent": 4},
    "sk-victim": ["beta"],
    "sk-tpm": {"adapters": [], "tokens_per_minute": 100},
    "sk-late": ["late"],
    "sk-refund": {"adapters": [], "tokens_per_minute": 1000},
}


@pytest.fixture(scope="module")
def server(llama_dir, tokenizer, adapter_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("tenants")
    adapter_dir = root / "adapters"
    adapter_dir.mkdir()
    for name in ("alpha", "beta"):
        shutil.copytree(adapter_root / name, adapter_dir / name)
    with serving(llama_dir, tokenizer, {}, KEYS, root, adapter_dir) as thread:
        yield thread


def client_for(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_adapter_only_on_disk_is_served_on_demand(server, adapter_root, tokenizer, reference):
    """`late` is copied into --adapter-dir after the server started and was never loaded: a
    request naming it is served, equal to transformers + peft with that adapter."""
    client = client_for(server, "sk-late")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="hi", max_tokens=1)
    shutil.copytree(adapter_root / "gamma", server.adapter_dir / "late")
    assert "late" in {m.id for m in client.models.list().data}
    assert "late" not in server.engine.adapters()       # listed as resolvable, not loaded
    prompt = "to be or not"
    ids = reference(tokenizer.encode(prompt), "gamma", 8)
    out = client.completions.create(model="late", prompt=prompt, max_tokens=8, temperature=0)
    assert out.choices[0].text == tokenizer.decode([t for t in ids
                                                    if t != tokenizer.eos_token_id])
    chat = client.chat.completions.create(model="late", max_tokens=2, messages=[
        {"role": "user", "content": "hi"}])
    assert chat.choices[0].finish_reason in ("length", "stop")
    # a key granted other adapters sees none of the dir's folders, and cannot resolve them
    assert {m.id for m in client_for(server, "sk-victim").models.list().data} == {"base",
                                                                                   "beta"}


def test_max_concurrent_is_429_with_retry_after(server):
    flood = client_for(server, "sk-flood")
    streams = [flood.completions.create(model="alpha", prompt="hi", max_tokens=64, stream=True,
                                        extra_body={"ignore_eos": True}) for _ in range(3)]
    for stream in streams:
        next(iter(stream))
    with pytest.raises(openai.RateLimitError) as info:
        flood.completions.create(model="alpha", prompt="hi", max_tokens=1, n=2)
    assert info.value.body["code"] == "key_rate_limited"
    assert "max_concurrent=4" in info.value.body["message"]
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert flood.completions.create(model="alpha", prompt="hi", max_tokens=1).choices  # the 4th
    with pytest.raises(openai.BadRequestError) as info:          # can never fit: 400, not 429
        flood.completions.create(model="alpha", prompt="hi", max_tokens=1, n=5)
    assert info.value.body["code"] == "over_key_limit"
    for stream in streams:
        stream.close()
    # other keys were never limited by the flood key's share
    assert client_for(server, "sk-victim").completions.create(model="beta", prompt="hi",
                                                              max_tokens=1).choices


def test_tokens_per_minute(server, tokenizer):
    tpm = client_for(server, "sk-tpm")
    prompt_tokens = len(tokenizer.encode("hi"))
    cost = prompt_tokens + 40
    done = 0
    while (done + 1) * cost <= 100:
        tpm.completions.create(model="base", prompt="hi", max_tokens=40,
                               extra_body={"ignore_eos": True})
        done += 1
    with pytest.raises(openai.RateLimitError) as info:
        tpm.completions.create(model="base", prompt="hi", max_tokens=40,
                               extra_body={"ignore_eos": True})
    assert "tokens_per_minute=100" in info.value.body["message"]
    retry_after = int(info.value.response.headers["retry-after"])
    # the bucket refills at 100 tokens/min: the missing tokens take (cost - left) * 0.6 s
    assert 1 <= retry_after <= int(cost * 60 / 100) + 1
    with pytest.raises(openai.BadRequestError) as info:
        tpm.completions.create(model="base", prompt="hi", max_tokens=60, n=2)
    assert info.value.body["code"] == "over_key_limit"


def test_unused_tokens_are_given_back(server, tokenizer):
    """A request that stops early is charged what it used, not prompt + max_tokens."""
    admin = client_for(server, "sk-admin")
    full = admin.completions.create(model="base", prompt="the quick", max_tokens=50,
                                    temperature=0, extra_body={"ignore_eos": True})
    text = full.choices[0].text
    stop = text[len(text) // 4: len(text) // 4 + 3]
    out = client_for(server, "sk-refund").completions.create(
        model="base", prompt="the quick", max_tokens=50, temperature=0, stop=[stop],
        extra_body={"ignore_eos": True})
    used = out.usage.total_tokens
    assert out.choices[0].finish_reason == "stop" and used < out.usage.prompt_tokens + 50
    quotas = server.app.state.lorafleet.quotas
    bucket = quotas.buckets[key_id("sk-refund")]
    bucket.refill(quotas.clock())
    # without the refund the level would be 1000 - (prompt + 50) plus a second's refill
    assert bucket.level >= 1000 - used - 1e-6


def test_flood_from_one_key_keeps_another_keys_latency_bounded(server):
    """sk-flood hammers the server from 12 threads (ignoring 429s) while sk-victim sends
    sequential requests. Bound: each victim request takes at most 6x its median alone plus
    1 s (the flood key holds at most 4 sequences; admission is shared across keys)."""
    victim = client_for(server, "sk-victim")

    def victim_request() -> float:
        started = time.perf_counter()
        out = victim.completions.create(model="beta", prompt="the quick", max_tokens=16,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 16
        return time.perf_counter() - started

    alone = statistics.median(victim_request() for _ in range(3))
    stop = threading.Event()
    counts = {"ok": 0, "429": 0}

    def flood():
        with httpx.Client(base_url=server.url, timeout=60,
                          headers={"Authorization": "Bearer sk-flood"}) as c:
            while not stop.is_set():
                resp = c.post("/v1/completions", json={
                    "model": "alpha", "prompt": "the quick brown fox", "max_tokens": 48,
                    "ignore_eos": True})
                counts["ok" if resp.status_code == 200 else str(resp.status_code)] += 1
                if resp.status_code == 429:
                    time.sleep(0.01)
    threads = [threading.Thread(target=flood, daemon=True) for _ in range(12)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        under_flood = [victim_request() for _ in range(4)]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert counts["ok"] > 0 and counts["429"] > 0, counts
    bound = 6 * alone + 1.0
    log.info("victim alone %.3f s, under flood %s s (bound %.3f s); flood %s", alone,
             [round(t, 3) for t in under_flood], bound, counts)
    assert max(under_flood) <= bound, (alone, under_flood, counts)


def test_the_key_id_reaches_the_engine_as_tenant(server, monkeypatch):
    """The engine shares admission across tenants: each request carries its key's id (never
    the secret); without keys there is one tenant, None."""
    seen = []
    real = server.engine.add_request

    def add_request(request_id, prompt_ids, adapter=None, params=None, tenant=None):
        seen.append(tenant)
        return real(request_id, prompt_ids, adapter, params, tenant=tenant)
    monkeypatch.setattr(server.engine, "add_request", add_request)
    client_for(server, "sk-victim").completions.create(model="beta", prompt="hi", max_tokens=1,
                                                       n=2)
    assert seen == [key_id("sk-victim")] * 2 and "sk-victim" not in seen[0]
