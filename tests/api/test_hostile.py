"""A hostile client against one real server on 127.0.0.1 (issue 13): malformed bodies, lax types,
values out of range, unimplemented options, bad names and paths, foreign keys, broken adapters.
Every answer is checked for its status and for OpenAI's error shape; valid-but-hostile values
(temperature 1e-40, top_k 2**63 - 1, seeds at the int64 edge) must be served. At the end the
server still answers a normal request exactly as the reference does, and the pool is all free.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time

import httpx
import openai
import pytest
from safetensors.torch import load_file, save_file

from .conftest import serving

KEYS = {"sk-admin": "*", "sk-alpha": ["alpha"], "sk-gamma": ["gamma"]}
MAX_BODY = 64 * 1024
MAX_ADAPTER = 1024 * 1024
ERROR_TYPES = {"invalid_request_error", "authentication_error", "permission_error",
               "rate_limit_error", "server_error"}


@pytest.fixture(scope="module")
def server(llama_dir, tokenizer, adapter_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    adapter_dir = root / "adapters"
    adapter_dir.mkdir()
    for name in ("alpha", "beta", "gamma"):
        shutil.copytree(adapter_root / name, adapter_dir / name)
    # weights that overflow float32 in the forward pass: finite, so they load
    overflow = adapter_dir / "overflow"
    shutil.copytree(adapter_root / "gamma", overflow)
    tensors = load_file(overflow / "adapter_model.safetensors")
    save_file({k: v * 1e30 for k, v in tensors.items()}, overflow / "adapter_model.safetensors")
    # a folder inside the dir whose config is a symlink to a file outside it
    outside = root / "outside"
    shutil.copytree(adapter_root / "alpha", outside)
    (adapter_dir / "linkfile").mkdir()
    os.symlink(outside / "adapter_config.json", adapter_dir / "linkfile" / "adapter_config.json")
    shutil.copy(outside / "adapter_model.safetensors", adapter_dir / "linkfile")
    os.symlink(outside, adapter_dir / "linkdir")
    # a folder over the server's adapter size cap
    shutil.copytree(adapter_root / "alpha", adapter_dir / "big")
    (adapter_dir / "big" / "padding.bin").write_bytes(b"\0" * MAX_ADAPTER)
    with serving(llama_dir, tokenizer, {"alpha": adapter_dir / "alpha",
                                        "beta": adapter_dir / "beta"}, KEYS, root, adapter_dir,
                 max_queue=16, max_body_bytes=MAX_BODY, max_adapter_bytes=MAX_ADAPTER) as thread:
        yield thread


@pytest.fixture(scope="module")
def raw(server):
    """httpx client without default headers: each case sets its own."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


ADMIN = {"Authorization": "Bearer sk-admin", "Content-Type": "application/json"}


def check_error(resp: httpx.Response, status: int, code=None, param=None) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in ERROR_TYPES, error
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def completion(**fields) -> dict:
    return {"model": "base", "prompt": "hi", "max_tokens": 1, **fields}


def chat(**fields) -> dict:
    return {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            **fields}


# ---- 1. the body itself ------------------------------------------------------------------------

BODY_CASES = {
    # name: (raw bytes, headers beyond the key, status, code)
    "no-content-type": (b'{"model": "base", "prompt": "hi"}', {}, 415, "unsupported_media_type"),
    "text-plain": (b'{"model": "base", "prompt": "hi"}', {"Content-Type": "text/plain"}, 415,
                   "unsupported_media_type"),
    "form": (b"model=base&prompt=hi", {"Content-Type": "application/x-www-form-urlencoded"},
             415, "unsupported_media_type"),
    "multipart": (b"--x\r\n\r\n--x--", {"Content-Type": "multipart/form-data; boundary=x"}, 415,
                  "unsupported_media_type"),
    "jsonx": (b"{}", {"Content-Type": "application/jsonx"}, 415, "unsupported_media_type"),
    "empty": (b"", {"Content-Type": "application/json"}, 400, "invalid_json"),
    "truncated": (b'{"model": "base"', {"Content-Type": "application/json"}, 400,
                  "invalid_json"),
    "single-quotes": (b"{'model': 'base'}", {"Content-Type": "application/json"}, 400,
                      "invalid_json"),
    "null": (b"null", {"Content-Type": "application/json"}, 400, "invalid_json"),
    "array": (b"[1, 2]", {"Content-Type": "application/json"}, 400, "invalid_json"),
    "number": (b"42", {"Content-Type": "application/json"}, 400, "invalid_json"),
    "string": (b'"hi"', {"Content-Type": "application/json"}, 400, "invalid_json"),
    "nan-constant": (b'{"model": "base", "prompt": "hi", "temperature": NaN}',
                     {"Content-Type": "application/json"}, 400, "invalid_json"),
    "infinity-constant": (b'{"model": "base", "prompt": "hi", "top_p": Infinity}',
                          {"Content-Type": "application/json"}, 400, "invalid_json"),
    "invalid-utf8": (b'{"model": "base", "prompt": "\xff\xfe"}',
                     {"Content-Type": "application/json"}, 400, "invalid_json"),
    "huge-integer": (b'{"model": "base", "prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}",
                     {"Content-Type": "application/json"}, 400, "invalid_json"),
    "deep-array": (b"[" * 20_000 + b"]" * 20_000, {"Content-Type": "application/json"}, 400,
                   None),
    "deep-object": (b'{"a":' * 50 + b"1" + b"}" * 50, {"Content-Type": "application/json"}, 400,
                    "too_deep"),
    "deep-in-field": (json.dumps(completion(user=None, logit_bias=None)).encode()[:-1]
                      + b', "x": ' + b"[" * 40 + b"]" * 40 + b"}",
                      {"Content-Type": "application/json"}, 400, "too_deep"),
    "lone-surrogate-prompt": (b'{"model": "base", "prompt": "a\\ud800b", "max_tokens": 1}',
                              {"Content-Type": "application/json"}, 400, "invalid_unicode"),
    "lone-surrogate-model": (b'{"model": "\\udfff", "prompt": "a"}',
                             {"Content-Type": "application/json"}, 400, "invalid_unicode"),
    "lone-surrogate-key": (b'{"model": "base", "prompt": "a", "\\ud800": 1}',
                           {"Content-Type": "application/json"}, 400, "invalid_unicode"),
    "lone-surrogate-stop": (b'{"model": "base", "prompt": "a", "stop": ["\\ud83d"]}',
                            {"Content-Type": "application/json"}, 400, "invalid_unicode"),
    "too-large": (json.dumps(completion(prompt="x" * MAX_BODY)).encode(),
                  {"Content-Type": "application/json"}, 413, "request_too_large"),
}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("case", sorted(BODY_CASES))
def test_bad_body(raw, path, case):
    content, headers, status, code = BODY_CASES[case]
    resp = raw.post(path, content=content, headers={"Authorization": "Bearer sk-admin",
                                                    **headers})
    check_error(resp, status, code)


def test_too_large_streamed_body_without_length(raw):
    def chunks():
        for _ in range(4):
            yield b" " * (MAX_BODY // 2)
        yield b"{}"
    resp = raw.post("/v1/completions", content=chunks(), headers=ADMIN)
    check_error(resp, 413, "request_too_large")


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/vnd.api+json"])
def test_json_content_types_are_accepted(raw, content_type):
    resp = raw.post("/v1/completions", content=json.dumps(completion()).encode(),
                    headers={"Authorization": "Bearer sk-admin", "Content-Type": content_type})
    assert resp.status_code == 200, resp.text


# ---- 2. fields: types and ranges -----------------------------------------------------------------

# (field, value): strict types (no bool for numbers, no strings for numbers or flags) and ranges
COMPLETION_FIELDS = [
    ("max_tokens", True), ("max_tokens", "5"), ("max_tokens", 1.5), ("max_tokens", 0),
    ("max_tokens", -3), ("max_tokens", []),
    ("n", True), ("n", 0), ("n", 129), ("n", "2"), ("n", 2.0),
    ("temperature", True), ("temperature", -0.1), ("temperature", 2.01), ("temperature", "1"),
    ("temperature", 3),
    ("top_p", 0), ("top_p", 1.5), ("top_p", -1), ("top_p", False), ("top_p", None),
    ("top_k", -2), ("top_k", 2**64), ("top_k", True), ("top_k", 1.5),
    ("seed", 2**63), ("seed", -(2**63) - 1), ("seed", True), ("seed", "1"), ("seed", 1.0),
    ("logprobs", True), ("logprobs", 6), ("logprobs", -1), ("logprobs", "2"),
    ("echo", "yes"), ("echo", 1), ("stream", "maybe"), ("stream", 1), ("stream", None),
    ("ignore_eos", "true"), ("ignore_eos", 0),
    ("stop", ["a"] * 65), ("stop", ["x" * 1025]), ("stop", [""]), ("stop", ""), ("stop", [1]), ("stop", 5),
    ("stop", {"a": 1}),
    ("prompt", [True, False]), ("prompt", [1.5]), ("prompt", []), ("prompt", None),
    ("prompt", 5), ("prompt", [[1, 2], []]), ("prompt", ["a"] * 257), ("prompt", {"a": 1}),
    ("prompt", [[True]]),
    ("presence_penalty", 2.5), ("frequency_penalty", True), ("repetition_penalty", 0),
    ("min_p", 1.5), ("min_tokens", -1), ("logit_bias", {"x": 1}), ("logit_bias", {"5": 101}),
    ("stop_token_ids", [-1]), ("stop_token_ids", "5"),
    ("response_format", {"type": "json_schema"}), ("response_format", "json"),
    ("model", 5), ("model", None), ("model", ["base"]),
    ("user", 5), ("stream_options", "yes"), ("stream_options", {"include_usage": "yes"}),
]
COMPLETION_FIELD_IDS = [f"{f}={json.dumps(v)[:20]}" for f, v in COMPLETION_FIELDS]


@pytest.mark.parametrize("field,value", COMPLETION_FIELDS, ids=COMPLETION_FIELD_IDS)
def test_completion_field_is_400_naming_it(raw, field, value):
    body = completion(**{field: value})
    resp = raw.post("/v1/completions", content=json.dumps(body).encode(), headers=ADMIN)
    error = check_error(resp, 400)
    assert error["param"] is not None and error["param"].split(".")[0] == field, error
    # streaming asked for or not, a request refused before it starts is one JSON error
    if field != "stream":
        streamed = raw.post("/v1/completions", content=json.dumps({**body, "stream": True}),
                            headers=ADMIN)
        assert check_error(streamed, 400)["param"] == error["param"]


CHAT_FIELDS = [
    ("messages", []), ("messages", None), ("messages", "hi"), ("messages", [5]),
    ("messages", [{"role": "wizard", "content": "x"}]), ("messages", [{"content": "x"}]),
    ("messages", [{"role": "user", "content": 5}]),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": 5}]}]),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": None}]}]),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]),
    ("messages", [{"role": "user", "content": [{"type": "text"}]}]),
    ("messages", [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "x"}}]}]),
    ("messages", [{"role": "user", "content": ["text"]}]),
    ("messages", [{"role": True, "content": "x"}]),
    ("logprobs", "yes"), ("logprobs", 1), ("top_logprobs", 21), ("top_logprobs", 3),
    ("top_logprobs", True), ("max_completion_tokens", 0), ("max_completion_tokens", True),
    ("n", 1000), ("temperature", [1]), ("seed", 2**64),
]


@pytest.mark.parametrize("field,value", CHAT_FIELDS,
                         ids=[f"{f}={json.dumps(v)[:30]}" for f, v in CHAT_FIELDS])
def test_chat_field_is_400_naming_it(raw, field, value):
    resp = raw.post("/v1/chat/completions", content=json.dumps(chat(**{field: value})),
                    headers=ADMIN)
    error = check_error(resp, 400)
    assert error["param"] is not None and error["param"].split(".")[0] == field, error


# ---- 3. options we know and do not implement ---------------------------------------------------

# (penalties, min_p, logit_bias, stop_token_ids, min_tokens and response_format json_object
# are implemented since issue 16: test_sampling_api.py)
UNIMPLEMENTED = [
    ("completions", "best_of", 3),
    ("completions", "suffix", "end"), ("completions", "use_beam_search", True),
    ("completions", "length_penalty", 0.5),
    ("chat", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("chat", "tool_choice", "required"), ("chat", "functions", [{"name": "f"}]),
    ("chat", "function_call", {"name": "f"}), ("chat", "modalities", ["audio"]),
]
NEUTRAL = [
    ("completions", {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": None,
                     "best_of": 1, "suffix": None, "repetition_penalty": 1}),
    ("completions", {"logit_bias": {}, "stop_token_ids": [], "min_tokens": 0, "min_p": 0,
                     "use_beam_search": False, "unknown_future_option": {"x": 1}}),
    ("completions", {"n": 2, "best_of": 2, "seed": 7}),
    ("chat", {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
              "presence_penalty": 0}),
    ("chat", {"tools": None, "functions": [], "function_call": "auto",
              "modalities": ["text"], "parallel_tool_calls": True, "store": False}),
]


@pytest.mark.parametrize("endpoint,field,value", UNIMPLEMENTED,
                         ids=[f"{e}-{f}" for e, f, _ in UNIMPLEMENTED])
def test_unimplemented_option_is_400_naming_it(raw, endpoint, field, value):
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    body = (completion if endpoint == "completions" else chat)(**{field: value})
    error = check_error(raw.post(path, content=json.dumps(body), headers=ADMIN), 400,
                        param=field)
    assert "not supported" in error["message"]


@pytest.mark.parametrize("endpoint,fields", NEUTRAL, ids=[str(i) for i in range(len(NEUTRAL))])
def test_neutral_values_of_unimplemented_options_are_served(raw, endpoint, fields):
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    body = (completion if endpoint == "completions" else chat)(**fields)
    resp = raw.post(path, content=json.dumps(body), headers=ADMIN)
    assert resp.status_code == 200, resp.text


# ---- 4. hostile values that are valid: served, not fatal ---------------------------------------

VALID_EXTREMES = [
    {"temperature": 1e-40, "seed": 1}, {"temperature": 2, "top_k": 2**63 - 1, "seed": 2},
    {"temperature": 1, "seed": 2**63 - 1, "n": 2}, {"temperature": 1, "seed": -(2**63), "n": 3},
    {"top_k": -1, "temperature": 1}, {"top_p": 1e-300, "temperature": 1},
    {"max_tokens": 64, "stop": ["\u0000"], "ignore_eos": True}, {"stop": "a"},
    {"prompt": [0, 383]}, {"prompt": "\u0000\u200b\U0001f600 \ufeff"}, {"logprobs": 5},
    {"logprobs": 0, "echo": True}, {"n": 16},
]


@pytest.mark.parametrize("fields", VALID_EXTREMES, ids=[str(i) for i in range(len(VALID_EXTREMES))])
@pytest.mark.parametrize("stream", [False, True])
def test_valid_extremes_are_served(raw, fields, stream):
    body = completion(**{"max_tokens": 2, **fields, "stream": stream})
    resp = raw.post("/v1/completions", content=json.dumps(body), headers=ADMIN)
    assert resp.status_code == 200, resp.text
    if stream:
        events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert all("error" not in json.loads(e) for e in events[:-1]), events
    else:
        assert len(resp.json()["choices"]) == body.get("n", 1)


# ---- 5. prompt contents and the server's limits ----------------------------------------------

LIMIT_CASES = [
    ({"prompt": [-1]}, 400, "invalid_token"), ({"prompt": [384]}, 400, "invalid_token"),
    ({"prompt": [2**63]}, 400, None), ({"prompt": ""}, 400, "empty_prompt"),
    ({"prompt": list(range(5, 5 + 130))}, 400, "context_length_exceeded"),
    ({"max_tokens": 65}, 400, "max_tokens_exceeded"),
    ({"max_tokens": 10**30}, 400, "max_tokens_exceeded"),
    ({"prompt": list(range(5, 105)), "max_tokens": 60}, 400, "context_length_exceeded"),
    ({"n": 17}, 400, "n_too_large"), ({"n": 128}, 400, "n_too_large"),
]


@pytest.mark.parametrize("fields,status,code", LIMIT_CASES,
                         ids=[str(i) for i in range(len(LIMIT_CASES))])
def test_limits(raw, fields, status, code):
    resp = raw.post("/v1/completions", content=json.dumps(completion(**fields)), headers=ADMIN)
    check_error(resp, status, code)


# ---- 6. keys, routes and models ------------------------------------------------------------------

AUTH_CASES = [
    ({}, 401, "missing_api_key"), ({"Authorization": "Bearer"}, 401, "missing_api_key"),
    ({"Authorization": "Token sk-admin"}, 401, "missing_api_key"),
    ({"Authorization": "Basic c2stYWRtaW46"}, 401, "missing_api_key"),
    ({"Authorization": "Bearer sk-admi"}, 401, "invalid_api_key"),
    ({"Authorization": "Bearer sk-admin2"}, 401, "invalid_api_key"),
    ({"Authorization": "Bearer SK-ADMIN"}, 401, "invalid_api_key"),
    ({"Authorization": "Bearer sk-\u00e9".encode("latin-1")}, 401, "invalid_api_key"),
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/models", "/v1/load_lora_adapter"])
@pytest.mark.parametrize("headers,status,code", AUTH_CASES,
                         ids=[str(i) for i in range(len(AUTH_CASES))])
def test_keys_are_required(raw, path, headers, status, code):
    headers = {"Content-Type": "application/json", **headers}
    if path == "/v1/models":
        resp = raw.get(path, headers=headers)
    else:
        resp = raw.post(path, content=json.dumps(completion()), headers=headers)
    check_error(resp, status, code)


MODEL_NAMES = ["nope", "", " base", "base ", "BASE", "../alpha", "alpha/", "a/b", "*", "__base__",
               "\u0000", "alpha\n", "x" * 5000, "linkfile", "linkdir", "overflow/../alpha"]


@pytest.mark.parametrize("model", MODEL_NAMES, ids=[repr(m[:12]) for m in MODEL_NAMES])
def test_unknown_or_unsafe_model_is_404(raw, model):
    resp = raw.post("/v1/completions", content=json.dumps(completion(model=model)),
                    headers=ADMIN)
    check_error(resp, 404, "model_not_found", "model")


@pytest.mark.parametrize("model", ["beta", "gamma", "overflow", "nope"])
def test_restricted_key_cannot_tell_others_adapters_from_missing_ones(raw, model, server):
    headers = {"Authorization": "Bearer sk-alpha", "Content-Type": "application/json"}
    resp = raw.post("/v1/completions", content=json.dumps(completion(model=model)),
                    headers=headers)
    error = check_error(resp, 404, "model_not_found", "model")
    assert error["message"] == (f"model {model!r} does not exist: use 'base' or a model "
                                f"listed by GET /v1/models")
    listed = {m["id"] for m in raw.get("/v1/models", headers=headers).json()["data"]}
    assert listed == {"base", "alpha"}


def test_restricted_key_never_causes_a_load(raw, server):
    """sk-alpha names gamma (a folder of the dir, not registered with this server at first use
    by it): the grant is checked before anything is resolved or loaded."""
    stats = server.engine.stats()
    resp = raw.post("/v1/completions", content=json.dumps(completion(model="gamma")),
                    headers={"Authorization": "Bearer sk-alpha",
                             "Content-Type": "application/json"})
    check_error(resp, 404, "model_not_found")
    after = server.engine.stats()
    moved = {k for k in stats if any(w in k for w in ("load", "miss", "resident", "adapter"))
             and after.get(k) != stats[k]}
    assert not moved, (moved, stats, after)


ROUTE_CASES = [("GET", "/v1/completions", 405), ("PUT", "/v1/chat/completions", 405),
               ("DELETE", "/v1/models", 405), ("POST", "/v1/models", 405),
               ("GET", "/v1/nothing", 404), ("POST", "/v2/completions", 404),
               ("GET", "/v1/load_lora_adapter", 405), ("PATCH", "/health", 405)]


@pytest.mark.parametrize("method,path,status", ROUTE_CASES,
                         ids=[f"{m}-{p}" for m, p, _ in ROUTE_CASES])
def test_routes(raw, method, path, status):
    check_error(raw.request(method, path, headers=ADMIN), status)


# ---- 7. run-time adapter loading -----------------------------------------------------------------

LOAD_CASES = [
    ({"lora_name": "__base__", "lora_path": "gamma"}, 400, "invalid_name", "lora_name"),
    ({"lora_name": "../escape", "lora_path": "gamma"}, 400, "invalid_name", "lora_name"),
    ({"lora_name": "a/b", "lora_path": "gamma"}, 400, "invalid_name", "lora_name"),
    ({"lora_name": "\u0001ctl", "lora_path": "gamma"}, 400, "invalid_name", "lora_name"),
    ({"lora_name": "*", "lora_path": "gamma"}, 400, "invalid_name", "lora_name"),
    ({"lora_name": " lead", "lora_path": "gamma"}, 400, "invalid_name", "lora_name"),
    ({"lora_name": "x" * 129, "lora_path": "gamma"}, 400, "invalid_name", "lora_name"),
    ({"lora_name": "x" * 300, "lora_path": "gamma"}, 400, "invalid_value", "lora_name"),
    ({"lora_name": "base", "lora_path": "gamma"}, 400, "invalid_name", "lora_name"),
    ({"lora_name": "", "lora_path": "gamma"}, 400, "invalid_value", "lora_name"),
    ({"lora_name": 5, "lora_path": "gamma"}, 400, "invalid_value", "lora_name"),
    ({"lora_name": True, "lora_path": "gamma"}, 400, "invalid_value", "lora_name"),
    ({"lora_path": "gamma"}, 400, "invalid_value", "lora_name"),
    ({"lora_name": "alpha", "lora_path": "gamma"}, 409, "already_loaded", "lora_name"),
    ({"lora_name": "ok1", "lora_path": "../gamma"}, 400, "invalid_path", "lora_path"),
    ({"lora_name": "ok1", "lora_path": "gamma/../../x"}, 400, "invalid_path", "lora_path"),
    ({"lora_name": "ok1", "lora_path": "gamma\u0000"}, 400, "invalid_path", "lora_path"),
    ({"lora_name": "ok1", "lora_path": "x" * 300}, 400, "invalid_path", "lora_path"),
    ({"lora_name": "ok1", "lora_path": "x" * 5000}, 400, "invalid_value", "lora_path"),
    ({"lora_name": "ok1", "lora_path": "/etc"}, 403, "path_outside_adapter_dir", "lora_path"),
    ({"lora_name": "ok1", "lora_path": "linkdir"}, 403, "path_outside_adapter_dir",
     "lora_path"),
    ({"lora_name": "ok1", "lora_path": "linkfile"}, 403, "path_outside_adapter_dir",
     "lora_path"),
    ({"lora_name": "ok1", "lora_path": "missing"}, 404, "adapter_not_found", "lora_path"),
    ({"lora_name": "ok1", "lora_path": "big"}, 413, "adapter_too_large", "lora_path"),
    ({"lora_name": "alpha\n", "lora_path": "gamma"}, 400, "invalid_name", "lora_name"),
    ({"lora_name": "x\ud800", "lora_path": "gamma"}, 400, "invalid_unicode", None),
    ({"lora_name": "ok1", "lora_path": 7}, 400, "invalid_value", "lora_path"),
    ({"lora_name": "ok1", "lora_path": ""}, 400, "invalid_value", "lora_path"),
]


@pytest.mark.parametrize("body,status,code,param", LOAD_CASES,
                         ids=[str(i) for i in range(len(LOAD_CASES))])
def test_load_refusals(raw, server, body, status, code, param):
    before = set(server.engine.adapters())
    resp = raw.post("/v1/load_lora_adapter", content=json.dumps(body), headers=ADMIN)
    check_error(resp, status, code, param)
    assert set(server.engine.adapters()) == before


UNLOAD_CASES = [({"lora_name": "never-loaded"}, 404), ({"lora_name": "../alpha"}, 404),
                ({"lora_name": 3}, 400), ({}, 400), ({"lora_name": "x" * 300}, 400)]


@pytest.mark.parametrize("body,status", UNLOAD_CASES,
                         ids=[str(i) for i in range(len(UNLOAD_CASES))])
def test_unload_refusals(raw, body, status):
    check_error(raw.post("/v1/unload_lora_adapter", content=json.dumps(body), headers=ADMIN),
                status)


def test_tenant_key_may_not_load_or_unload(raw):
    headers = {"Authorization": "Bearer sk-alpha", "Content-Type": "application/json"}
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        resp = raw.post(path, content=json.dumps({"lora_name": "alpha", "lora_path": "alpha"}),
                        headers=headers)
        check_error(resp, 403, "not_admin")


def test_adapter_over_the_size_cap_is_refused_and_not_listed(raw, server):
    """A folder added at run time: requests may make the server read it, within the cap."""
    big = server.adapter_dir / "big-late"
    shutil.copytree(server.adapter_dir / "big", big)
    resp = raw.post("/v1/completions", content=json.dumps(completion(model="big-late")),
                    headers=ADMIN)
    check_error(resp, 413, "adapter_too_large", "model")
    listed = {m["id"] for m in raw.get("/v1/models", headers=ADMIN).json()["data"]}
    assert "big-late" not in listed and {"gamma", "overflow"} <= listed
    assert not {"linkfile", "linkdir"} & listed


# ---- 8. an adapter that overflows: its requests fail alone, with a 500 -------------------------

@pytest.mark.parametrize("fields", [{}, {"logprobs": 2}, {"temperature": 1, "seed": 3},
                                    {"n": 2}])
def test_overflowing_adapter_fails_alone(raw, fields):
    body = completion(model="overflow", max_tokens=3, **fields)
    error = check_error(raw.post("/v1/completions", content=json.dumps(body), headers=ADMIN),
                        500, "engine_error")
    assert "non-finite" in error["message"]
    resp = raw.post("/v1/completions", content=json.dumps({**body, "stream": True}),
                    headers=ADMIN)
    assert resp.status_code == 200
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "engine_error" and "non-finite" in error["message"]
    assert "NaN" not in resp.text.replace("(NaN or Inf)", "")


def test_overflowing_chat_stream_ends_with_error_event(raw):
    body = chat(model="overflow", stream=True, max_tokens=3)
    resp = raw.post("/v1/chat/completions", content=json.dumps(body), headers=ADMIN)
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"


def test_hostile_requests_mixed_into_a_batch_leave_the_others_exact(server, tokenizer,
                                                                    reference):
    """Ordinary requests sent at the same time as overflowing, tiny-temperature and malformed
    ones (so they share engine steps) come back exactly as the reference computes them."""
    prompts = ["the quick brown fox", "to be or not", "food : french"]
    expected = {p: reference(tokenizer.encode(p), "alpha", 6) for p in prompts}
    hostile = [completion(model="overflow", max_tokens=6, logprobs=3),
               completion(model="overflow", max_tokens=6, stream=True),
               completion(temperature=1e-40, seed=1, max_tokens=6),
               completion(top_k=2**63 - 1, temperature=2, seed=2, max_tokens=6, n=3),
               completion(max_tokens=True), completion(prompt=[True])]
    results: dict[int, httpx.Response] = {}

    def send(i, body):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            results[i] = c.post("/v1/completions", content=json.dumps(body), headers=ADMIN)
    bodies = [completion(model="alpha", prompt=p, max_tokens=6, temperature=0)
              for p in prompts] + hostile
    threads = [threading.Thread(target=send, args=(i, b)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, prompt in enumerate(prompts):
        ids = expected[prompt]
        assert results[i].status_code == 200, results[i].text
        assert results[i].json()["choices"][0]["text"] == tokenizer.decode(
            [t for t in ids if t != tokenizer.eos_token_id])
    statuses = [results[len(prompts) + j].status_code for j in range(len(hostile))]
    assert statuses == [500, 200, 200, 200, 400, 400], statuses


# ---- and after all that: still correct, nothing leaked ---------------------------------------

def test_zz_still_serves_correctly_and_the_pool_is_free(server, tokenizer, reference):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-admin", max_retries=0,
                           timeout=60)
    prompt = "the quick brown fox"
    ids = reference(tokenizer.encode(prompt), "alpha", 8)
    out = client.completions.create(model="alpha", prompt=prompt, max_tokens=8, temperature=0)
    assert out.choices[0].text == tokenizer.decode([t for t in ids
                                                    if t != tokenizer.eos_token_id])
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    deadline = time.monotonic() + 15
    while True:
        stats = server.engine.stats()
        if stats["running"] == stats["queue_depth"] == stats["pages_kv"] == 0:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
    server.engine.pool.check()
    app_state = server.app.state.lorafleet
    assert app_state.outstanding == 0 and not app_state.in_use
    assert not app_state.loading and not app_state.unloading
