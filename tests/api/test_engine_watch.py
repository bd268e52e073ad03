"""A watched engine (issue 13): a step that raises fails only what it was running, with a 500
(not a 400), counts in /metrics and turns /health to 503 until a step succeeds; if the step
thread dies, every waiter is woken with an error and /health stays 503. Also the admin races:
concurrent loads and unloads of one name are serialized."""
from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time

import httpx
import pytest

from lorafleet.api.server import ServerConfig, create_app

from .conftest import ServerThread, build_engine


@pytest.fixture
def fresh(llama_dir, tokenizer, adapter_root, tmp_path):
    """A server of its own (these tests break its engine on purpose)."""
    adapter_dir = tmp_path / "adapters"
    adapter_dir.mkdir()
    shutil.copytree(adapter_root / "gamma", adapter_dir / "gamma")
    async_engine = build_engine(llama_dir, tokenizer, {})
    app = create_app(async_engine, tokenizer, ServerConfig(model_name="base", max_model_len=128,
                                                           adapter_dir=adapter_dir))
    thread = ServerThread(app).start()
    thread.engine, thread.async_engine = async_engine.engine, async_engine
    yield thread
    thread.stop()


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def post(url, path, body, timeout=60):
    return httpx.post(url + path, json=body, timeout=timeout)


def test_failed_step_is_500_counted_and_unhealthy_until_the_next_good_step(fresh, monkeypatch):
    runner = fresh.engine.runner
    real_run = runner.run
    fail = {"left": 1}

    def run(*args, **kwargs):
        if fail["left"]:
            fail["left"] -= 1
            raise RuntimeError("injected kernel failure")
        return real_run(*args, **kwargs)
    monkeypatch.setattr(runner, "run", run)
    resp = post(fresh.url, "/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 4})
    assert resp.status_code == 500, resp.text
    error = resp.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_error"
    assert "injected kernel failure" in error["message"]
    assert metric(fresh.url, "lorafleet_engine_failed_steps_total") == 1
    health = httpx.get(fresh.url + "/health", timeout=10)
    assert health.status_code == 503 and "failed" in health.json()["reason"]
    # the next request runs a good step: served, and healthy again
    ok = post(fresh.url, "/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    assert httpx.get(fresh.url + "/health", timeout=10).status_code == 200
    assert fresh.engine.stats()["pages_kv"] == 0


def test_dead_engine_thread_wakes_waiters_and_health_is_503(fresh, monkeypatch):
    engine = fresh.engine

    def broken(*args, **kwargs):
        raise RuntimeError("step exploded")

    def broken_handling(message):
        raise RuntimeError("failure handling exploded too")
    monkeypatch.setattr(engine.runner, "run", broken)
    monkeypatch.setattr(engine, "fail_running", broken_handling)
    with httpx.Client(base_url=fresh.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={
                "model": "base", "prompt": "hi", "max_tokens": 8, "stream": True}) as resp:
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "engine thread stopped" in error["message"]
    health = httpx.get(fresh.url + "/health", timeout=10)
    assert health.status_code == 503 and "engine thread stopped" in health.json()["reason"]
    later = post(fresh.url, "/v1/completions", {"model": "base", "prompt": "hi",
                                                "max_tokens": 2}, timeout=10)
    assert later.status_code == 503 and later.json()["error"]["code"] == "engine_unavailable"


def test_concurrent_loads_and_unloads_of_one_name_are_serialized(fresh):
    def race(path, body, n=2):
        results, barrier = [], threading.Barrier(n)

        def one():
            barrier.wait()
            results.append(post(fresh.url, path, body))
        threads = [threading.Thread(target=one) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sorted(r.status_code for r in results), results

    for round_ in range(3):
        statuses, results = race("/v1/load_lora_adapter",
                                 {"lora_name": f"g{round_}", "lora_path": "gamma"})
        assert statuses == [200, 409], [r.text for r in results]
        assert {r.json()["error"]["code"] for r in results if r.status_code == 409} <= {
            "adapter_busy", "already_loaded"}
        statuses, results = race("/v1/unload_lora_adapter", {"lora_name": f"g{round_}"})
        assert statuses == [200, 404], [r.text for r in results]
        assert f"g{round_}" not in fresh.engine.adapters()


def test_collect_is_cancelled_with_its_handler():
    """--drain-timeout cancels handlers still running: the job's collecting task must go with
    them, not be left for shutdown to wait on."""
    from lorafleet.api.generation import collect_unless_disconnected

    class Request:
        async def is_disconnected(self):
            return False

    class SlowJob:
        cancelled = closed = False

        async def close(self):
            SlowJob.closed = True

        async def collect(self):
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                SlowJob.cancelled = True
                raise

    async def main():
        handler = asyncio.create_task(collect_unless_disconnected(Request(), SlowJob()))
        await asyncio.sleep(0.05)
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler
        leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return leftovers

    started = time.monotonic()
    assert asyncio.run(main()) == []
    assert SlowJob.cancelled and SlowJob.closed and time.monotonic() - started < 5


def test_tokenizing_runs_off_the_event_loop(fresh, tokenizer, monkeypatch):
    """A prompt that takes the tokenizer 1.5 s (a multi-MB one would) must not hold up
    /health: tokenizing runs in a worker thread."""
    real_encode = tokenizer.encode

    def slow_encode(text, *args, **kwargs):
        time.sleep(1.5)
        return real_encode(text, *args, **kwargs)
    monkeypatch.setattr(tokenizer, "encode", slow_encode)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("resp", post(
        fresh.url, "/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 1})))
    worker.start()
    time.sleep(0.2)
    health_times = []
    while worker.is_alive() and len(health_times) < 5:
        started = time.perf_counter()
        assert httpx.get(fresh.url + "/health", timeout=10).status_code == 200
        health_times.append(time.perf_counter() - started)
        time.sleep(0.1)
    worker.join()
    assert result["resp"].status_code == 200
    assert health_times and max(health_times) < 0.5, health_times
