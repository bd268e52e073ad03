"""The keys file and the adapter-path confinement, as plain functions."""
from __future__ import annotations

import json
import os

import pytest

from lorafleet.api.auth import (ApiKeys, BadPathError, PathOutsideError, bearer_token,
                                resolve_adapter_path)
from lorafleet.errors import ConfigError


def test_keys_file(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"sk-a": ["x", "y"], "sk-root": "*"}))
    keys = ApiKeys.from_file(path)
    a, root = keys.lookup("sk-a"), keys.lookup("sk-root")
    assert a.allows("x") and not a.allows("z") and a.allows(None) and not a.is_admin
    assert root.allows("anything") and root.is_admin
    assert keys.lookup("sk-") is None and keys.lookup("") is None and keys.lookup(None) is None


@pytest.mark.parametrize("content,message", [
    ("{oops", "invalid JSON at line 1"), ("[]", "non-empty JSON object"),
    ('{"k": "all"}', "expected a list of adapter names"), ('{"k": [1]}', "list of adapter")])
def test_bad_keys_file_names_the_problem(tmp_path, content, message):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        ApiKeys.from_file(path)
    with pytest.raises(ConfigError, match="does not exist"):
        ApiKeys.from_file(tmp_path / "missing.json")


def test_bearer_token():
    assert bearer_token("Bearer sk-1") == "sk-1"
    assert bearer_token("bearer  sk-1 ") == "sk-1"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_adapter_paths_are_confined(tmp_path):
    root = tmp_path / "adapters"
    (root / "a" / "inner").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", root / "link-out")
    os.symlink(root / "a", root / "link-in")
    assert resolve_adapter_path(root, "a") == (root / "a").resolve()
    assert resolve_adapter_path(root, str(root / "a" / "inner")) == (root / "a/inner").resolve()
    assert resolve_adapter_path(root, "link-in") == (root / "a").resolve()
    for bad in ("../secret", "a/../../secret", "a\x00"):
        with pytest.raises(BadPathError):
            resolve_adapter_path(root, bad)
    for outside in ("link-out", str(tmp_path / "secret"), "/etc"):
        with pytest.raises(PathOutsideError):
            resolve_adapter_path(root, outside)


def test_keys_file_with_limits(tmp_path):
    from lorafleet.api.auth import key_id
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({
        "sk-old": ["x"], "sk-root": "*",
        "sk-a": {"adapters": ["x"], "max_concurrent": 4, "tokens_per_minute": 10000},
        "sk-b": {"adapters": "*", "max_concurrent": 2}}))
    keys = ApiKeys.from_file(path)
    old, a, b = keys.lookup("sk-old"), keys.lookup("sk-a"), keys.lookup("sk-b")
    assert old.max_concurrent is None and old.tokens_per_minute is None and old.allows("x")
    assert (a.adapters, a.max_concurrent, a.tokens_per_minute) == (frozenset({"x"}), 4, 10000)
    assert b.is_admin and b.max_concurrent == 2 and b.tokens_per_minute is None
    # the key's id is stable, distinct per key, and never contains the secret
    assert a.key_id == key_id("sk-a") != b.key_id and "sk-a" not in a.key_id


@pytest.mark.parametrize("grant,message", [
    ({"adapters": ["x"], "max_concurrent": 0}, "max_concurrent must be an integer >= 1"),
    ({"adapters": ["x"], "max_concurrent": True}, "max_concurrent must be an integer >= 1"),
    ({"adapters": ["x"], "tokens_per_minute": "10"}, "tokens_per_minute must be an integer"),
    ({"adapters": ["x"], "rpm": 5}, "unknown field"), ({"max_concurrent": 2}, "needs \"adapters\""),
    ({"adapters": 5}, "expected a list of adapter names")])
def test_bad_limits_name_the_field(tmp_path, grant, message):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"sk-a": grant}))
    with pytest.raises(ConfigError, match=message):
        ApiKeys.from_file(path)


def test_quotas_with_a_fake_clock():
    from lorafleet.api.quota import Quotas
    now = [0.0]
    quotas = Quotas(clock=lambda: now[0])
    assert quotas.admit("k", 2, 600, 1, 300) is None
    assert quotas.admit("k", 2, 600, 1, 300) is None         # bucket now empty, 2 in flight
    refused = quotas.admit("k", 2, 600, 1, 10)
    assert refused.retry_after == 1.0 and "max_concurrent=2" in refused.message
    quotas.release("k", 1, unused_tokens=100)                  # one done, used 200 of its 300
    assert quotas.admit("k", 2, 600, 1, 100) is None           # the 100 given back
    quotas.release("k", 1, 0)
    refused = quotas.admit("k", 2, 600, 1, 60)                 # 600/min = 10 tokens/s
    assert refused.retry_after == pytest.approx(6.0) and "tokens_per_minute=600" in refused.message
    now[0] = 6.0
    assert quotas.admit("k", 2, 600, 1, 60) is None
    assert quotas.admit("k", 2, 600, 1, 601).retry_after is None   # never fits: a 400
    assert quotas.admit("k", 2, 600, 3, 1).retry_after is None     # more choices than allowed
    assert quotas.admit("other", 2, 600, 1, 600) is None           # keys do not share
