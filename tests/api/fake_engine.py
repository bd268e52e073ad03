"""A deterministic stand-in for `lorafleet.serve` used only until the real engine exists:
same interface (docs/architecture.md, "Serving engine"), trivial "model": each next token is a
function of the prompt, the adapter name and the step."""
from __future__ import annotations

import asyncio
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.errors import AdapterError, EngineError, RequestError


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list = field(default_factory=list)
    logprobs: bool = False
    ignore_eos: bool = False


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list
    new_text: str
    finished: bool
    finish_reason: str | None
    logprobs: list | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


def fake_next_token(prompt_ids, adapter, generated, vocab):
    salt = zlib.crc32((adapter or "").encode())
    return (sum(prompt_ids) * 31 + len(generated) * 7 + salt) % (vocab - 4) + 4


class FakeEngine:
    def __init__(self, tokenizer, vocab=384):
        self.tokenizer, self.vocab = tokenizer, vocab
        self._adapters: dict[str, str] = {}
        self.running: dict[str, dict] = {}
        self.lock = threading.RLock()

    def register_adapter(self, name, path):
        path = Path(path)
        if not (path / "adapter_config.json").exists():
            raise AdapterError(f"{path}: no adapter_config.json")
        if not (path / "adapter_model.safetensors").exists():
            raise AdapterError(f"{path}: no adapter_model.safetensors (pickled .bin refused)")
        from safetensors.torch import load_file
        try:
            load_file(str(path / "adapter_model.safetensors"))
        except Exception as exc:
            raise AdapterError(f"{path}: {exc}") from exc
        self._adapters[name] = str(path)

    def unregister_adapter(self, name):
        with self.lock:
            if any(r["adapter"] == name for r in self.running.values()):
                raise EngineError(f"adapter {name} in use")
            del self._adapters[name]

    def adapters(self):
        return list(self._adapters)

    def add_request(self, request_id, prompt_ids, adapter, params):
        if adapter is not None and adapter not in self._adapters:
            raise RequestError(f"unknown adapter {adapter}")
        with self.lock:
            self.running[request_id] = dict(prompt=list(prompt_ids), adapter=adapter,
                                            params=params, out=[], text="")

    def abort(self, request_id):
        with self.lock:
            self.running.pop(request_id, None)

    def has_work(self):
        return bool(self.running)

    def step(self):
        outputs = []
        with self.lock:
            for rid, req in list(self.running.items()):
                tok = fake_next_token(req["prompt"], req["adapter"], req["out"], self.vocab)
                req["out"].append(tok)
                text = self.tokenizer.decode([tok])
                req["text"] += text
                finished = len(req["out"]) >= req["params"].max_tokens
                reason = "length" if finished else None
                for stop in req["params"].stop:
                    if stop in req["text"]:
                        finished, reason = True, "stop"
                        before = len(req["text"]) - len(text)
                        text = req["text"][:req["text"].index(stop)][before:]
                if finished:
                    del self.running[rid]
                outputs.append(RequestOutput(rid, [tok], text, finished, reason,
                                             [-0.5] if req["params"].logprobs else None,
                                             len(req["prompt"]), len(req["out"])))
        return outputs

    def generate_ids(self, prompt_ids, adapter, max_tokens):
        out = []
        for _ in range(max_tokens):
            out.append(fake_next_token(prompt_ids, adapter, out, self.vocab))
        return out

    def stats(self):
        with self.lock:
            kv = sum(len(r["prompt"]) + len(r["out"]) for r in self.running.values())
            return {"queue_depth": 0, "running": len(self.running), "pages_kv": kv,
                    "pages_adapter": 0, "pages_total": 10000, "pages_free": 10000 - kv,
                    "adapters_in_use": 0, "cache_hits": 0, "cache_misses": 0,
                    "cache_evictions": 0}


class FakeAsyncEngine:
    def __init__(self, engine, step_delay=0.002):
        self.engine, self.step_delay = engine, step_delay
        self.queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        import time
        while not self.stopping or self.engine.has_work():
            if not self.engine.has_work():
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            for out in self.engine.step():
                target = self.queues.get(out.request_id)
                if target:
                    target[0].call_soon_threadsafe(target[1].put_nowait, out)
            time.sleep(self.step_delay)

    async def stream(self, request_id, prompt_ids, adapter, params):
        queue = asyncio.Queue()
        self.queues[request_id] = (asyncio.get_running_loop(), queue)
        try:
            self.engine.add_request(request_id, prompt_ids, adapter, params)
            self.wake.set()
            while True:
                out = await queue.get()
                yield out
                if out.finished:
                    return
        finally:
            self.queues.pop(request_id, None)

    async def abort(self, request_id):
        self.engine.abort(request_id)
        self.queues.pop(request_id, None)

    async def shutdown(self, drain=True):
        self.stopping = True
        self.wake.set()
        await asyncio.to_thread(self.thread.join, 30)
