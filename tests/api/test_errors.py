"""Every refusal the server promises, in the OpenAI error shape, and that it keeps serving."""
from __future__ import annotations

import httpx
import openai
import pytest


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_malformed_json_is_400(http):
    resp = http.post("/v1/completions", content=b"{not json",
                     headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert "not valid JSON" in error_of(resp)["message"]
    resp = http.post("/v1/completions", json=[1, 2])
    assert resp.status_code == 400


@pytest.mark.parametrize("field,value", [("temperature", 5), ("max_tokens", 0), ("n", 0),
                                         ("top_p", 0), ("logprobs", 9), ("stop", ["a"] * 65)])
def test_bad_field_is_400_naming_it(http, field, value):
    resp = http.post("/v1/completions", json={"model": "base", "prompt": "hi", field: value})
    assert resp.status_code == 400
    error = error_of(resp)
    assert error["param"] == field and field in error["message"]
    assert error["type"] == "invalid_request_error"


def test_missing_field_is_400(http):
    resp = http.post("/v1/chat/completions", json={"model": "base"})
    assert resp.status_code == 400 and error_of(resp)["param"] == "messages"
    resp = http.post("/v1/chat/completions", json={"model": "base", "messages": [
        {"role": "wizard", "content": "x"}]})
    assert resp.status_code == 400 and error_of(resp)["param"].startswith("messages.0.role")


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert info.value.body["code"] == "model_not_found"
    assert info.value.body["param"] == "model"


def test_prompt_too_long_names_the_limit(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="base", prompt=list(range(5, 5 + 130)), max_tokens=2)
    assert "max_model_len=128" in info.value.body["message"]
    assert info.value.body["param"] == "prompt"


def test_max_tokens_too_large_names_the_limit(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="base", prompt="hi", max_tokens=65)
    assert "max_tokens_limit=64" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="base", prompt=list(range(5, 5 + 100)), max_tokens=60)
    assert "max_model_len=128" in info.value.body["message"]
    assert info.value.body["param"] == "max_tokens"


def test_token_ids_outside_vocab_are_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="base", prompt=[3, 99999], max_tokens=2)
    assert "99999" in info.value.body["message"]


def test_unknown_route_is_404_in_error_shape(http):
    resp = http.get("/v1/nothing")
    assert resp.status_code == 404 and error_of(resp)["code"] == "not_found"


def test_keys(server):
    import openai as oa

    def client(key):
        return oa.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30)

    no_key = httpx.get(server.url + "/v1/models", timeout=10)
    assert no_key.status_code == 401 and error_of(no_key)["code"] == "missing_api_key"
    with pytest.raises(oa.AuthenticationError):
        client("sk-wrong").models.list()
    with pytest.raises(oa.AuthenticationError):
        client("sk-wrong").completions.create(model="base", prompt="hi", max_tokens=1)
    # a tenant key sees and uses only its adapters (and the shared base)
    assert {m.id for m in client("sk-alpha").models.list().data} == {"base", "alpha"}
    assert {m.id for m in client("sk-none").models.list().data} == {"base"}
    client("sk-alpha").completions.create(model="alpha", prompt="hi", max_tokens=1)
    # Another tenant's adapter answers exactly as a missing one (issue 13: a 403 here told a
    # restricted key which adapter names exist).
    with pytest.raises(oa.NotFoundError) as info:
        client("sk-alpha").completions.create(model="beta", prompt="hi", max_tokens=1)
    with pytest.raises(oa.NotFoundError) as missing:
        client("sk-alpha").completions.create(model="betb", prompt="hi", max_tokens=1)
    assert info.value.body["code"] == missing.value.body["code"] == "model_not_found"
    assert info.value.body["message"].replace("beta", "betb") == missing.value.body["message"]
    with pytest.raises(oa.NotFoundError):
        client("sk-alpha").chat.completions.create(
            model="beta", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    # only "*" keys manage adapters
    resp = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "alpha"},
                      headers={"Authorization": "Bearer sk-alpha"}, timeout=10)
    assert resp.status_code == 403 and error_of(resp)["code"] == "not_admin"
    # /health and /metrics stay open for probes and scrapers
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_chat_content_parts(client, http):
    parts = [{"type": "text", "text": "food : "}, {"type": "text", "text": "french"}]
    as_parts = client.chat.completions.create(model="base", max_tokens=4, temperature=0,
                                              messages=[{"role": "user", "content": parts}])
    as_text = client.chat.completions.create(model="base", max_tokens=4, temperature=0,
                                             messages=[{"role": "user",
                                                        "content": "food : french"}])
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    resp = http.post("/v1/chat/completions", json={"model": "base", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert resp.status_code == 400 and "only text content parts" in error_of(resp)["message"]
