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
