"""Adapters added and removed at run time, bad adapter files, unload while in use, client
disconnects, and the bounded queue."""
from __future__ import annotations

import json
import os
import shutil
import time

import httpx
import openai
import pytest
import torch
from .conftest import ServerThread, build_engine
from safetensors.torch import load_file, save_file

from lorafleet.api.server import ServerConfig, create_app


def pool_idle(stats) -> bool:
    """No sequence left and no KV page held."""
    # Keys indexed directly: a renamed stats key must fail here, not read as 0 ("idle").
    return stats["running"] == 0 and stats["pages_kv"] == 0 and stats["queue_depth"] == 0


def wait_until(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_load_use_unload(client, http, tokenizer, reference):
    # Loaded under a name that is not a folder of --adapter-dir: once unloaded it is gone (a
    # folder's own name would be found again on demand).
    resp = http.post("/v1/load_lora_adapter", json={"lora_name": "gamma-rt",
                                                    "lora_path": "gamma"})
    assert resp.status_code == 200, resp.text
    assert "gamma-rt" in {m.id for m in client.models.list().data}
    prompt_ids = tokenizer.encode("to be or not")
    ids = reference(prompt_ids, "gamma", 6)
    out = client.completions.create(model="gamma-rt", prompt="to be or not", max_tokens=6,
                                    temperature=0)
    assert out.choices[0].text == tokenizer.decode([t for t in ids
                                                    if t != tokenizer.eos_token_id])
    # A second load of a loaded name is a conflict (409, issue 13), not a silent replace.
    again = http.post("/v1/load_lora_adapter", json={"lora_name": "gamma-rt",
                                                     "lora_path": "gamma"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_loaded"
    assert http.post("/v1/unload_lora_adapter",
                     json={"lora_name": "gamma-rt"}).status_code == 200
    assert "gamma-rt" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gamma-rt", prompt="hi", max_tokens=2)
    gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "gamma-rt"})
    assert gone.status_code == 404


def test_adapter_paths_stay_inside_adapter_dir(http, adapter_root, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(adapter_root / "gamma", outside)
    link = adapter_root / "escape"
    if not link.exists():
        os.symlink(outside, link)
    cases = {"../gamma": 400, "gamma/../../x": 400, str(outside): 403, "escape": 403,
             "does-not-exist": 404}
    for path, status in cases.items():
        resp = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
        assert resp.status_code == status, (path, resp.text)
        assert resp.json()["error"]["param"] == "lora_path"
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "x"}).status_code == 400


def _bad_adapters(adapter_root):
    good = adapter_root / "alpha"
    corrupt = adapter_root / "bad-corrupt"
    pickled = adapter_root / "bad-pickle"
    shapes = adapter_root / "bad-shapes"
    for folder in (corrupt, pickled, shapes):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        shutil.copy(good / "adapter_config.json", folder)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage-not-json")
    tensors = load_file(good / "adapter_model.safetensors")
    torch.save(tensors, pickled / "adapter_model.bin")
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
    save_file(tensors, shapes / "adapter_model.safetensors")
    return {"corrupt": corrupt, "pickle": pickled, "shapes": shapes}


def test_bad_adapter_files_are_reported_and_server_keeps_serving(client, http, adapter_root):
    for kind, folder in _bad_adapters(adapter_root).items():
        # (named apart from the folder: the folder itself is listed as resolvable, issue 12)
        resp = http.post("/v1/load_lora_adapter",
                         json={"lora_name": f"x-bad-{kind}", "lora_path": folder.name})
        assert resp.status_code == 400, (kind, resp.text)
        assert resp.json()["error"]["code"] == "adapter_load_failed"
        assert f"x-bad-{kind}" not in {m.id for m in client.models.list().data}
        # named by a request, the folder fails to resolve with the same clear error
        on_demand = http.post("/v1/completions", json={"model": folder.name, "prompt": "hi",
                                                       "max_tokens": 1})
        assert on_demand.status_code in (400, 404), on_demand.text
        if on_demand.status_code == 400:
            assert on_demand.json()["error"]["code"] == "adapter_load_failed"
        assert client.completions.create(model="alpha", prompt="hi", max_tokens=2).choices


def test_unload_while_in_use_is_409_naming_the_request(client, http):
    stream = client.completions.create(model="beta", prompt="the quick", max_tokens=64,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    first = next(iter(stream))
    resp = http.post("/v1/unload_lora_adapter", json={"lora_name": "beta"})
    assert resp.status_code == 409, resp.text
    assert first.id in resp.json()["error"]["message"]
    list(stream)  # finish it; afterwards beta is still served
    assert client.completions.create(model="beta", prompt="hi", max_tokens=1).choices


def test_client_disconnect_aborts_and_frees_pages(server, http):
    def aborted():
        for line in http.get("/metrics").text.splitlines():
            if line.startswith('lorafleet_aborted_requests_total{adapter="alpha"}'):
                return float(line.split()[-1])
        return 0.0
    before = aborted()
    with httpx.Client(base_url=server.url, timeout=30,
                      headers={"Authorization": "Bearer sk-admin"}) as c:
        with c.stream("POST", "/v1/completions", json={
                "model": "alpha", "prompt": "the quick brown", "max_tokens": 64,
                "ignore_eos": True, "stream": True}) as resp:
            lines = resp.iter_lines()
            next(lines), next(lines)
    assert wait_until(lambda: aborted() == before + 1)
    assert wait_until(lambda: pool_idle(server.engine.stats())), server.engine.stats()


def test_full_queue_is_429(llama_dir, tokenizer, adapter_root):
    async_engine = build_engine(llama_dir, tokenizer, {})
    app = create_app(async_engine, tokenizer, ServerConfig(model_name="base", max_model_len=128,
                                                           max_queue=2))
    server = ServerThread(app).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                               timeout=30)
        holding = client.completions.create(model="base", prompt="hi", max_tokens=100,
                                            n=2, stream=True, extra_body={"ignore_eos": True})
        next(iter(holding))
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model="base", prompt="hi", max_tokens=1)
        assert "max_queue=2" in info.value.body["message"]
        holding.close()  # the client goes away: its slots come back

        def admitted():
            try:
                return bool(client.completions.create(model="base", prompt="hi",
                                                      max_tokens=1).choices)
            except openai.RateLimitError:
                return False
        assert wait_until(admitted)
    finally:
        server.stop()


def test_non_streaming_client_disconnect_aborts(server, http, monkeypatch):
    # Poll for the disconnect often: the engine finishes this job (32 x 64 tokens of a tiny
    # model) in about the default poll interval, which would make the test a race.
    monkeypatch.setattr("lorafleet.api.generation.DISCONNECT_POLL_S", 0.01)

    def aborted():
        for line in http.get("/metrics").text.splitlines():
            if line.startswith('lorafleet_aborted_requests_total{adapter="beta"}'):
                return float(line.split()[-1])
        return 0.0
    before = aborted()
    body = {"model": "beta", "prompt": "the quick", "max_tokens": 64, "n": 32,
            "ignore_eos": True}
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(5.0, read=0.05),
                   headers={"Authorization": "Bearer sk-admin"})
    assert wait_until(lambda: aborted() == before + 1), time.monotonic() - started
    assert wait_until(lambda: pool_idle(server.engine.stats())), server.engine.stats()
