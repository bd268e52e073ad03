"""The demo's steps as plain functions: data -> one LoRA adapter per task -> a server with all of
them -> concurrent requests to every adapter and to the bare base -> scores -> merge one adapter
and check that the merged model answers identically.

The library never prints: each step reports through the `on_event(dict)` callback and returns
plain data; `lorafleet demo` (cli/demo.py) renders progress bars and tables.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lorafleet.demo.tasks import TASKS, TaskExample, clean_output, get_task, make_split, \
    partial_score, score, write_jsonl
from lorafleet.errors import ConfigError, EngineError, TrainingError

log = logging.getLogger(__name__)

Event = Callable[[dict], None]
BASE_NAME = "base"  # the model id the server gives the bare base model


def default_base_model() -> Path:
    """The small Llama pretrained on Shakespeare and Milton that ships inside the package."""
    return Path(__file__).resolve().parent.parent / "assets" / "base-model"


@dataclass
class DemoConfig:
    work: Path = Path("out/demo")
    base: Path = field(default_factory=default_base_model)
    tasks: tuple[str, ...] = ("e2e", "json", "upper")
    n_train: int = 3000
    n_test: int = 10            # held-out prompts per task sent to every model
    steps: int = 200            # optimizer steps per adapter
    batch_size: int = 16
    # Measured on the embedded model: 3e-3 for 100 steps learned the output format but not the
    # copying of names; 1e-2 for 200 steps copies them.
    lr: float = 1e-2
    r: int = 8
    alpha: float = 16.0
    targets: str = "all-linear"  # QLoRA sec. 4: every linear layer; a 5M model needs the help
    max_tokens: int = 48
    seed: int = 0
    merge_task: str = "json"

    def __post_init__(self):
        for task in self.tasks:
            get_task(task)
        if self.merge_task not in self.tasks:
            raise ConfigError(f"merge_task {self.merge_task!r} is not one of tasks {self.tasks}")
        if not (self.base / "config.json").is_file():
            raise ConfigError(f"base model folder {self.base} has no config.json")


# ---------------------------------------------------------------- 1. data

def prepare_data(cfg: DemoConfig) -> dict[str, tuple[Path, list[TaskExample]]]:
    """Write each task's train JSONL; return {task: (train file, held-out test examples)}."""
    out = {}
    for task in cfg.tasks:
        train = make_split(task, "train", cfg.n_train, cfg.seed)
        test = make_split(task, "test", cfg.n_test, cfg.seed)
        out[task] = (write_jsonl(cfg.work / "data" / f"{task}.train.jsonl", train), test)
    return out


# ---------------------------------------------------------------- 2. training

def train_adapters(cfg: DemoConfig, data: dict[str, tuple[Path, list]],
                   on_event: Event | None = None) -> dict[str, Path]:
    """One LoRA adapter per task with lorafleet.train; returns {task: PEFT adapter folder}."""
    from lorafleet.train.trainer import TrainConfig, train

    adapters = {}
    for task, (train_file, _) in data.items():
        tcfg = TrainConfig.from_flat(model=str(cfg.base), data=str(train_file),
                                     out=str(cfg.work / "runs" / task), method="lora", r=cfg.r,
                                     alpha=cfg.alpha, targets=cfg.targets, steps=cfg.steps,
                                     batch_size=cfg.batch_size, lr=cfg.lr, warmup=10, bf16=True,
                                     max_len=128, seed=cfg.seed, overwrite=True, device="cpu")
        if on_event:
            on_event({"type": "train_start", "task": task, "total_steps": cfg.steps})

        def forward(event: dict, task=task) -> None:
            if on_event and event.get("type") == "step":
                on_event({**event, "task": task})

        result = train(tcfg, callback=forward)
        if result.interrupted:  # Ctrl-C / SIGTERM: the trainer saved a checkpoint and returned
            raise TrainingError(f"training the {task!r} adapter was interrupted at step "
                                f"{result.steps}; the demo stops here")
        adapters[task] = result.artifact
        if on_event:
            on_event({"type": "train_end", "task": task, "loss": result.loss,
                      "adapter": str(result.artifact)})
    return adapters


# ---------------------------------------------------------------- 3. the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: Path, adapters: dict[str, Path], port: int, log_file: Path,
                 timeout_s: float = 120.0) -> subprocess.Popen:
    """`lorafleet serve` in a subprocess on 127.0.0.1:port with every adapter registered; returns
    once /health answers (or raises EngineError with the server's log tail)."""
    import httpx

    cmd = [sys.executable, "-m", "lorafleet.cli", "serve", "--model", str(base),
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", BASE_NAME]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handle = log_file.open("w")
    proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            handle.close()
            raise EngineError(f"the server exited with code {proc.returncode}:\n"
                              f"{log_file.read_text()[-2000:]}\ncommand: {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(proc)
    raise EngineError(f"the server did not answer /health within {timeout_s:.0f} s:\n"
                      f"{log_file.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- 4. requests and scores

@dataclass
class Row:
    task: str
    model: str          # adapter name or BASE_NAME
    prompt: str
    output: str
    reference: str
    latency_s: float = 0.0


def query_all(url: str, data: dict[str, tuple[Path, list[TaskExample]]], models: list[str],
              max_tokens: int, concurrency: int = 16) -> list[Row]:
    """Every test prompt of every task to every model in `models`, all in flight at once
    (greedy, stop at the end of the line), over /v1/completions."""
    import httpx

    jobs = [(task, model, example) for task, (_, tests) in data.items() for model in models
            for example in tests]

    def one(client: httpx.Client, task: str, model: str, example: TaskExample) -> Row:
        t0 = time.perf_counter()
        response = client.post(f"{url}/v1/completions", json={
            "model": model, "prompt": example.prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "stop": ["\n"]})
        if response.status_code != 200:
            raise EngineError(f"{model} on {task!r}: HTTP {response.status_code}: "
                              f"{response.text[:300]}")
        text = response.json()["choices"][0]["text"]
        return Row(task, model, example.prompt, text, example.references[0],
                   time.perf_counter() - t0)

    with httpx.Client(timeout=300.0) as client, \
            concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(one, client, *job) for job in jobs]
        return [f.result() for f in futures]


def score_rows(rows: list[Row], data: dict[str, tuple[Path, list[TaskExample]]],
               metric=score) -> dict:
    """{task: {model: score}} with the task's metric (or `partial_score`) over its prompts."""
    scores: dict[str, dict[str, float]] = {}
    for task, (_, tests) in data.items():
        by_prompt = {e.prompt: e for e in tests}
        for model in sorted({r.model for r in rows if r.task == task}):
            mine = [r for r in rows if r.task == task and r.model == model]
            scores.setdefault(task, {})[model] = metric(
                task, [r.output for r in mine], [by_prompt[r.prompt] for r in mine])
    return scores


def row_score(row: Row, example: TaskExample) -> float:
    """The task's metric on one row (sentence BLEU for e2e, 0/100 for exact match)."""
    return score(row.task, [row.output], [example])


def row_partial(row: Row, example: TaskExample) -> float:
    return partial_score(row.task, [row.output], [example])


# ---------------------------------------------------------------- 5. merge

@dataclass
class MergeCheck:
    task: str
    outputs_lora: list[str]
    outputs_merged: list[str]
    ms_per_token_lora: float
    ms_per_token_merged: float
    merged_dir: Path | None = None

    @property
    def identical(self) -> bool:
        return self.outputs_lora == self.outputs_merged


def merge_and_compare(cfg: DemoConfig, adapter: Path, examples: list[TaskExample]) -> MergeCheck:
    """Greedy outputs of base + LoRA (unmerged, the adapter applied on the side) vs the same
    model after B A is merged into the base weights and the LoRA layers removed; and their
    per-token decode times."""
    import torch

    from lorafleet.lora.peft_model import load_adapter
    from lorafleet.lora.merge import unload
    from lorafleet.models import load_model, load_tokenizer
    from lorafleet.models.generate import SamplingParams, generate

    tokenizer = load_tokenizer(cfg.base)
    model = load_model(cfg.base, dtype=torch.float32)
    load_adapter(model, adapter, "task")
    sampling = SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0, stop=["\n"])

    def run(lora) -> tuple[list[str], float]:
        texts, tokens, t0 = [], 0, time.perf_counter()
        with torch.inference_mode():
            for e in examples:
                g = generate(model, tokenizer.encode(e.prompt), sampling=sampling, lora=lora,
                             tokenizer=tokenizer)
                texts.append(g.text)
                tokens += max(1, len(g.token_ids))
        return texts, 1000 * (time.perf_counter() - t0) / tokens

    with_lora, ms_lora = run("task")
    unload(model, "task")  # merge B A into W0 and put the plain linears back: no LoRA code left
    merged, ms_merged = run(None)
    return MergeCheck(cfg.merge_task, with_lora, merged, ms_lora, ms_merged)


__all__ = ["DemoConfig", "Row", "MergeCheck", "default_base_model", "prepare_data",
           "train_adapters", "free_port", "start_server", "stop_server", "query_all",
           "score_rows", "row_score", "row_partial", "partial_score", "merge_and_compare",
           "clean_output", "TASKS", "BASE_NAME"]
