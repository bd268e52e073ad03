"""Fixtures of the API tests: a real uvicorn server on 127.0.0.1 (random free port, in a thread)
over an engine, PEFT adapters with random B made by peft itself, and an `openai` client."""
from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # reference.py
from lorafleet.api.auth import ApiKeys
from lorafleet.api.server import ServerConfig, create_app

ADAPTER_NAMES = ["alpha", "beta"]


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread; `stop()` drains like SIGTERM."""

    def __init__(self, app):
        import uvicorn
        self.sock = free_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                                    timeout_graceful_shutdown=30))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def start(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def make_adapters(base_dir: Path, out_root: Path, names: list[str], r: int = 4,
                  targets=("q_proj", "v_proj")) -> dict[str, Path]:
    """PEFT adapters over the checkpoint in `base_dir`, written by peft, with random B (a
    zero B would make every adapter equal the base and the tests blind)."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets))
    peft_model = peft.get_peft_model(model, config)
    paths = {}
    for i, name in enumerate(names):
        torch.manual_seed(1000 + i)
        for module_name, param in peft_model.named_parameters():
            if "lora_B" in module_name or "lora_A" in module_name:
                with torch.no_grad():
                    param.copy_(torch.randn_like(param) * 0.5)
        path = out_root / name
        peft_model.save_pretrained(path)
        paths[name] = path
    return paths


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory, llama_dir):
    root = tmp_path_factory.mktemp("adapters")
    make_adapters(llama_dir, root, ADAPTER_NAMES + ["gamma"])
    return root


@pytest.fixture(scope="session")
def tokenizer(llama_dir):
    from lorafleet.models import load_tokenizer
    return load_tokenizer(llama_dir)


def build_engine(llama_dir, tokenizer, adapters: dict[str, Path]):
    from lorafleet.serve import AsyncEngine, Engine, EngineConfig
    engine = Engine(str(llama_dir), tokenizer, EngineConfig())
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    return AsyncEngine(engine)


KEYS = {"sk-admin": "*", "sk-alpha": ["alpha"], "sk-none": []}


@contextlib.contextmanager
def serving(llama_dir, tokenizer, adapters: dict[str, Path], keys: dict, keys_dir: Path,
            adapter_dir: Path, **config):
    """A started ServerThread over a fresh engine with `adapters` registered, the keys written to
    keys_dir/keys.json, run-time loading from adapter_dir, and the limits the API tests share
    (model "base", 128 positions, max_tokens 64, queue 64); `config` adds or overrides
    ServerConfig fields. The thread carries .engine, .adapter_dir and .app; stopped on exit."""
    keys_file = keys_dir / "keys.json"
    keys_file.write_text(json.dumps(keys))
    async_engine = build_engine(llama_dir, tokenizer, adapters)
    config = ServerConfig(**{"model_name": "base", "max_model_len": 128, "max_tokens_limit": 64,
                             "max_queue": 64, "adapter_dir": adapter_dir,
                             "api_keys": ApiKeys.from_file(keys_file), "vocab_size": 384,
                             **config})
    app = create_app(async_engine, tokenizer, config)
    thread = ServerThread(app).start()
    thread.engine, thread.adapter_dir, thread.app = async_engine.engine, adapter_dir, app
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture(scope="module")
def server(llama_dir, tokenizer, adapter_root, tmp_path_factory):
    """One server per test module, with keys: sk-admin (all), sk-alpha (alpha only)."""
    with serving(llama_dir, tokenizer, {n: adapter_root / n for n in ADAPTER_NAMES}, KEYS,
                 tmp_path_factory.mktemp("keys"), adapter_root) as thread:
        yield thread


@pytest.fixture
def client(server):
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sk-admin", max_retries=0,
                         timeout=60)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60,
                      headers={"Authorization": "Bearer sk-admin"}) as c:
        yield c


@pytest.fixture(scope="session")
def reference(llama_dir, adapter_root):
    """reference(prompt_ids, adapter, max_tokens) -> greedy token ids."""
    from .reference import GreedyOracle
    return GreedyOracle(llama_dir, {n: adapter_root / n for n in ADAPTER_NAMES + ["gamma"]})
