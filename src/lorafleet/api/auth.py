"""Who may use which adapter, and which adapter paths may be loaded over HTTP.

The keys file is JSON mapping each API key to the adapters it may use, or to "*" for all:

    {"sk-team-a": ["support-bot", "sql"], "sk-admin": "*"}

Every valid key may use the base model (it is shared by everyone); only keys with "*" may load
or unload adapters at run time, because a loaded adapter becomes visible to every "*" key.
"""
from __future__ import annotations

import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

from lorafleet.errors import ConfigError

ALL_ADAPTERS = "*"


@dataclass(frozen=True)
class Grant:
    """What one key may do: `adapters` is None for every adapter."""

    adapters: frozenset[str] | None

    @property
    def is_admin(self) -> bool:
        return self.adapters is None

    def allows(self, adapter: str | None) -> bool:
        return adapter is None or self.adapters is None or adapter in self.adapters


# With no keys file the server is open: one grant for everybody, admin included.
OPEN = Grant(adapters=None)


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
            if allowed == ALL_ADAPTERS:
                grants[key] = Grant(adapters=None)
            elif isinstance(allowed, list) and all(isinstance(a, str) for a in allowed):
                grants[key] = Grant(adapters=frozenset(allowed))
            else:
                raise ConfigError(f"API keys file {path}: key {key[:4]}...: expected a list of "
                                  f"adapter names or \"*\", got {allowed!r}")
        return cls(grants)

    def lookup(self, key: str | None) -> Grant | None:
        """The grant of `key`, or None when the key is missing or unknown."""
        if not key:
            return None
        for known, grant in self.grants.items():
            # Constant-time comparison so response timing does not leak key prefixes.
            if hmac.compare_digest(known.encode(), key.encode()):
                return grant
        return None


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


def resolve_adapter_path(adapter_dir: str | Path, requested: str) -> Path:
    """Resolve `requested` (relative to `adapter_dir`, or absolute) and make sure the real path,
    after following every symlink, is inside the real `adapter_dir`."""
    if "\x00" in requested:
        raise BadPathError("lora_path contains a NUL byte")
    if ".." in Path(requested).parts:
        raise BadPathError(f"lora_path must not contain '..': {requested!r}")
    root = Path(os.path.realpath(adapter_dir))
    candidate = Path(requested)
    if not candidate.is_absolute():
        candidate = root / candidate
    real = Path(os.path.realpath(candidate))
    if real != root and root not in real.parents:
        raise PathOutsideError(f"lora_path {requested!r} resolves outside the adapter "
                               f"directory {str(root)!r}")
    return real
