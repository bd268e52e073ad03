"""What every route shares: the server's limits (`ServerConfig`), its state (`ServerState`: the
engine pair, tokenizer, metrics, per-key quotas, which requests use which adapter) and the error
every refusal is answered with (`ApiError`, OpenAI's error shape)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastapi.responses import JSONResponse

from lorafleet.api.auth import ApiKeys
from lorafleet.api.metrics import ServerMetrics
from lorafleet.api.protocol import error_body
from lorafleet.api.quota import Quotas
from lorafleet.serve import AsyncEngine, Engine

# A generation request is a prompt and a few options: 8 MiB holds a prompt far beyond any
# context we serve (the tokenizer would take seconds on more), and bounds what one request
# makes the server read and parse.
DEFAULT_MAX_BODY_BYTES = 8 * 2**20
# Chat content parts are the deepest legitimate nesting (body -> messages -> message ->
# content -> part -> field); 32 levels leave room for clients' extra fields and refuse the
# thousands-deep bodies that overflow Python's recursion limit.
DEFAULT_MAX_JSON_DEPTH = 32
# A rank-64 adapter on every linear layer of a 70B Llama is about 1.6 GB in float32: 4 GiB
# admits any real adapter and refuses a folder that would fill host memory.
DEFAULT_MAX_ADAPTER_BYTES = 4 * 2**30


@dataclass
class ServerConfig:
    """model_name: the id clients use for the bare base model.
    max_model_len: prompt + generated tokens per sequence (default: the engine's).
    max_tokens_limit: the largest `max_tokens` a request may ask for (default: max_model_len).
    max_queue: sequences accepted and not yet finished (waiting + running); beyond it -> 429.
    adapter_dir: the only folder adapters may be loaded from, by `/v1/load_lora_adapter` or on
    demand (None: run-time loading disabled).
    api_keys: None serves everyone; otherwise every request needs a key from it.
    max_body_bytes: larger request bodies get 413. max_json_depth: deeper JSON gets 400.
    max_adapter_bytes: an adapter folder larger than this is not loaded over HTTP.
    """

    model_name: str = "base"
    max_model_len: int | None = None
    max_tokens_limit: int | None = None
    max_queue: int = 256
    adapter_dir: str | Path | None = None
    api_keys: ApiKeys | None = None
    vocab_size: int | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES
    # Log each generation request at INFO (id, model, token counts, sampling options; never
    # the prompt text): `--enable-log-requests`.
    log_requests: bool = False
    # Sampling defaults from the model's generation_config.json (temperature, top_p, top_k,
    # repetition_penalty, min_p): used where a request leaves the field out.
    generation_defaults: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"ServerConfig.max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_queue < 1:
            raise ValueError(f"ServerConfig.max_queue must be >= 1, got {self.max_queue}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"ServerConfig.max_body_bytes must be >= 1024, got "
                             f"{self.max_body_bytes}")
        if self.max_json_depth < 4:
            raise ValueError(f"ServerConfig.max_json_depth must be >= 4, got "
                             f"{self.max_json_depth}")

    def fill_from(self, engine: Engine) -> None:
        """Take the limits the caller left open from the engine and its model."""
        if self.max_model_len is None:
            self.max_model_len = getattr(engine, "max_model_len", None) or 2048
        if self.max_tokens_limit is None:
            self.max_tokens_limit = self.max_model_len
        if self.vocab_size is None:
            model_config = getattr(getattr(engine, "model", None), "config", None)
            self.vocab_size = getattr(model_config, "vocab_size", None)


# generation_config.json keys that become request defaults (vLLM's --generation-config auto).
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "min_p")


def read_generation_defaults(model_dir: str | Path) -> dict:
    """The sampling defaults a checkpoint's generation_config.json sets ({} without one)."""
    import json
    import logging

    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        logging.getLogger(__name__).warning("ignoring %s: %s", path, exc)
        return {}
    return {k: raw[k] for k in GENERATION_DEFAULT_KEYS
            if isinstance(raw, dict) and isinstance(raw.get(k), (int, float))
            and not isinstance(raw.get(k), bool)}


class ApiError(Exception):
    """An error answered in the OpenAI shape {"error": {message, type, param, code}}.
    `retry_after` (seconds) adds a Retry-After header (429, 503)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)
        self.retry_after = retry_after

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        headers = None
        if self.retry_after is not None:
            headers = {"Retry-After": str(max(1, int(self.retry_after + 0.999)))}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


@dataclass
class ServerState:
    """What the routes share: the engine pair, tokenizer, config, metrics, per-key quotas, and
    which requests use which adapter (to refuse unloading those)."""

    engine: Engine
    async_engine: AsyncEngine
    tokenizer: object
    config: ServerConfig
    metrics: ServerMetrics
    quotas: Quotas = field(default_factory=Quotas)
    outstanding: int = 0
    in_use: dict[str | None, set[str]] = field(default_factory=dict)
    # When each adapter was last asked for (wall-clock seconds): GET /v1/adapters shows it.
    last_used: dict[str | None, float] = field(default_factory=dict)
    # Adapter names with a load or unload in progress: a second one of the same name is
    # refused (409) instead of racing the first.
    loading: set[str] = field(default_factory=set)
    unloading: set[str] = field(default_factory=set)
    draining: bool = False
