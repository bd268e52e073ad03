"""Who may use which adapter, and which adapter paths may be loaded over HTTP.

The keys file is JSON mapping each API key to the adapters it may use, or to "*" for all:

    {"sk-team-a": ["support-bot", "sql"], "sk-admin": "*"}

or, with per-key limits (quota.py), to an object:

    {"sk-team-a": {"adapters": ["sql"], "max_concurrent": 4, "tokens_per_minute": 10000}}

Every valid key may use the base model (it is shared by everyone); only keys with "*" may load
or unload adapters at run time, because a loaded adapter becomes visible to every "*" key.
A key is known inside the server by `key_id` (a hash prefix, never the secret): the engine's
tenant, and the name in logs.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

from lorafleet.errors import ConfigError

ALL_ADAPTERS = "*"
GRANT_FIELDS = ("adapters", "max_concurrent", "tokens_per_minute")


@dataclass(frozen=True)
class Grant:
    """What one key may do: `adapters` is None for every adapter; limits None = unlimited."""

    adapters: frozenset[str] | None
    key_id: str | None = None
    max_concurrent: int | None = None
    tokens_per_minute: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.adapters is None

    def allows(self, adapter: str | None) -> bool:
        return adapter is None or self.adapters is None or adapter in self.adapters


# With no keys file the server is open: one grant for everybody, admin included.
OPEN = Grant(adapters=None)


def key_id(key: str) -> str:
    """A stable, non-secret name for a key: 12 hex digits of its SHA-256."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _parse_grant(path: Path, key: str, value) -> Grant:
    where = f"API keys file {path}: key {key[:4]}..."
    limits: dict[str, int | None] = {"max_concurrent": None, "tokens_per_minute": None}
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(GRANT_FIELDS))
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; expected {GRANT_FIELDS}")
        if "adapters" not in value:
            raise ConfigError(f"{where}: the object needs \"adapters\" (a list or \"*\")")
        for name in limits:
            limit = value.get(name)
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                      or limit < 1):
                raise ConfigError(f"{where}: {name} must be an integer >= 1, got {limit!r}")
            limits[name] = limit
        value = value["adapters"]
    if value == ALL_ADAPTERS:
        adapters = None
    elif isinstance(value, list) and all(isinstance(a, str) for a in value):
        adapters = frozenset(value)
    else:
        raise ConfigError(f"{where}: expected a list of adapter names or \"*\", got {value!r}")
    return Grant(adapters, key_id(key), **limits)


class ApiKeys:
    def __init__(self, grants: dict[str, Grant]):
        self.grants = grants

    @classmethod
    def from_file(cls, path: str | Path) -> "ApiKeys":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"API keys file {path} does not exist") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"API keys file {path}: invalid JSON at line {exc.lineno}: "
                              f"{exc.msg}") from exc
        if not isinstance(raw, dict) or not raw:
            raise ConfigError(f"API keys file {path}: expected a non-empty JSON object "
                              f"{{key: [adapters] or \"*\"}}, got {type(raw).__name__}")
        grants = {}
        for key, allowed in raw.items():
            if not key:
                raise ConfigError(f"API keys file {path}: empty key")
            grants[key] = _parse_grant(path, key, allowed)
        return cls(grants)

    def lookup(self, key: str | None) -> Grant | None:
        """The grant of `key`, or None when the key is missing or unknown."""
        if not key:
            return None
        found = None
        for known, grant in self.grants.items():
            # Constant-time comparison, over every key, so response timing does not leak key
            # prefixes or positions. Non-ASCII bytes compare fine as UTF-8.
            if hmac.compare_digest(known.encode(), key.encode("utf-8", "surrogatepass")):
                found = grant
        return found


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class PathOutsideError(Exception):
    """An adapter path resolves outside the allowed folder (after following symlinks)."""


class BadPathError(Exception):
    """An adapter path is malformed (contains `..`, NUL, ...)."""


# Longest path component most file systems allow (NAME_MAX): a longer one is a bad request,
# not an OSError from the file system.
NAME_MAX = 255


def resolve_adapter_path(adapter_dir: str | Path, requested: str) -> Path:
    """Resolve `requested` (relative to `adapter_dir`, or absolute) and make sure the real path,
    after following every symlink, is inside the real `adapter_dir`."""
    if "\x00" in requested:
        raise BadPathError("lora_path contains a NUL byte")
    try:
        requested.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadPathError("lora_path is not valid UTF-8 (a lone surrogate)") from exc
    if ".." in Path(requested).parts:
        raise BadPathError(f"lora_path must not contain '..': {requested!r}")
    if any(len(part.encode()) > NAME_MAX for part in Path(requested).parts):
        raise BadPathError(f"lora_path has a component longer than {NAME_MAX} bytes")
    root = Path(os.path.realpath(adapter_dir))
    candidate = Path(requested)
    if not candidate.is_absolute():
        candidate = root / candidate
    real = Path(os.path.realpath(candidate))
    if real != root and root not in real.parents:
        raise PathOutsideError(f"lora_path {requested!r} resolves outside the adapter "
                               f"directory {str(root)!r}")
    return real


def confine_folder_files(adapter_dir: str | Path, folder: Path) -> int:
    """Every entry of `folder` must resolve inside `adapter_dir` too: a folder inside the dir
    whose adapter_config.json or weights are symlinks to files outside would otherwise be read.
    Returns the folder's size in bytes (its files')."""
    root = Path(os.path.realpath(adapter_dir))
    size = 0
    for entry in sorted(folder.iterdir()):
        real = Path(os.path.realpath(entry))
        if root not in real.parents:
            raise PathOutsideError(f"{entry.name!r} in adapter folder {folder.name!r} resolves "
                                   f"outside the adapter directory")
        if real.is_file():
            size += real.stat().st_size
    return size
