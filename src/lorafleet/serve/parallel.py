"""Tensor-parallel serving (S-LoRA sec. 6): one model over N processes on one machine.

The engine process is rank 0: it schedules, owns the page pool's bookkeeping (which pages hold
what), samples, and computes its own shard of every step like the others. Ranks 1..N-1 are
worker processes (torch.multiprocessing, spawn) that hold their shard of the weights, of the KV
cache and of the adapters (shard.py) and run each step as rank 0 sends it:

    rank 0: schedule -> pages to write, step inputs (token ids, positions, page tables, adapter
            runs: a few KB) -> every worker's pipe -> its own forward -> sample
    rank r: wait on the pipe -> write pages / run the same forward (no logits)
    all:    inside the forward, one all-reduce per row-parallel projection (o_proj, down_proj:
            2 per layer) over the group (collectives.py: gloo on CPU, NCCL on CUDA with rank r
            on cuda:r); vocab-sharded (shard.py), one gather of the logits to rank 0 and, with
            the embedding split too, one all-reduce of the embedded tokens

Control goes through a pipe per worker rather than a collective so an idle server waits
without a collective timing out, and metadata never has to be a (CUDA, for NCCL) tensor; only
the forward's collectives use torch.distributed, with `timeout_s`. A worker that dies or
fails: its error (from its error queue, or its exit code) is raised as EngineError by the step
that meets it (a collective that fails, or the liveness check before each step), and every
later step raises it at once: never a hang.

Page ids mean the same on every rank: each rank's pool has the same number of pages of the same
size (the hidden size), KV pages hold a rank's local KV heads, adapters keep the unsharded page
layout (shard.py). So rank 0 decides every page id and the workers mirror only what the LoRA
batch builder reads: each resident adapter's page ids and module slices, sent with the first
step that uses that (adapter, load).
"""
from __future__ import annotations

import datetime
import logging
import os
import pickle
import queue
import time
import traceback
import weakref
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from lorafleet.errors import ConfigError, EngineError

from .adapter_registry import file_pages
from .collectives import (STARTUP_TIMEOUT_S, Collectives, CommStats, check_devices, new_group,
                          rank_device)
from .lora_batch import LoraBatchBuilder
from .runner import ModelRunner, StepInputs
from .shard import builder_shapes, check_tensor_parallel, shard_model, shard_pages, shard_plan

log = logging.getLogger(__name__)

POLL_S = 0.5                  # how often an idle worker checks that the engine still lives


def check_start(model, world: int, device: str) -> None:
    """Every ConfigError known before loading, in this order: the model's shape (from a
    checkpoint folder's config.json, or a loaded model's config), then the GPUs or cores."""
    from lorafleet.models.config import ModelConfig

    config = ModelConfig.from_hf(model) if isinstance(model, (str, Path)) else model.config
    check_tensor_parallel(config, world)
    check_devices(world, device)


class ShardedLoraBatchBuilder(LoraBatchBuilder):
    """LoraBatchBuilder over a rank's pool: kernels see the local features, pages per row as
    in the unsharded adapter layout."""

    def __init__(self, pages, cache, local_targets, full_targets):
        super().__init__(pages, cache, local_targets)
        self._shapes = builder_shapes(local_targets, full_targets, pages.shape[1])


class TensorParallel:
    """Rank 0's side: starts the workers, shards the engine's model, and forwards pages and
    steps. Built by Engine when EngineConfig.tensor_parallel_size > 1."""

    def __init__(self, source, model, world: int, dtype: torch.dtype, device: str,
                 timeout_s: float, quantize: str | None = None, vocab: str = "replicated"):
        """source: the checkpoint folder the workers load (on CPU also the loaded model,
        unsharded, sent pickled); model: rank 0's loaded copy (on cuda:0 for CUDA), sharded
        here in place. quantize "nf4": every rank quantizes its own shard. vocab: how the
        embedding and lm_head are split (engine_config.VOCAB_MODES). The Engine ran `check_start`
        (sizes, GPUs or cores) before loading."""
        if device != "cpu" and not isinstance(source, (str, Path)):
            raise ConfigError("tensor parallelism on CUDA needs the checkpoint folder, not a "
                              "loaded model: each worker loads its own copy onto its GPU")
        self.world, self.timeout_s, self.vocab = world, timeout_s, vocab
        self.plans = [shard_plan(model.config, r, world) for r in range(world)]
        self.failed: str | None = None
        self.stats = CommStats()
        self._sent: set[tuple[str, int]] = set()
        ctx = torch.multiprocessing.get_context("spawn")
        store = dist.TCPStore("127.0.0.1", 0, world, True,
                              datetime.timedelta(seconds=STARTUP_TIMEOUT_S),
                              wait_for_workers=False)
        self.errors = ctx.Queue()
        self.conns, self.procs = [], []
        threads = max(1, (os.cpu_count() or 1) // world)
        for rank in range(1, world):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_main, name=f"lorafleet-tp-{rank}", daemon=True,
                               args=(rank, world, store.port, source, dtype, device, timeout_s,
                                     threads, theirs, self.errors, quantize, vocab))
            proc.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(proc)
        self._finalizer = weakref.finalize(self, _stop, self.conns, self.procs)
        self.store = store
        try:        # gloo: waits for every worker to join; NCCL: at the first collective
            self.group = new_group(store, 0, world, device, timeout_s)
        except (RuntimeError, dist.DistError) as exc:
            self._finalizer()                               # stop whatever did start
            self._fail(f"the workers did not join the process group ({exc})")
        self.comm = Collectives(self.group, 0, world, timeout_s, self.stats, self._fail)
        self.full_targets = shard_model(model, 0, world, self.comm.all_reduce, quantize, vocab,
                                        self.comm.gather)

    # ---- wiring into the engine -------------------------------------------------------------

    def attach(self, engine) -> None:
        """After the engine built its runner and cache: send the workers the pool's size, route
        adapter pages and steps through here, and wait until every worker is ready."""
        runner, cache = engine.runner, engine.cache
        self.runner, self.cache = runner, cache
        runner.attach(cache, ShardedLoraBatchBuilder(runner.pages, cache, runner.targets,
                                                     self.full_targets))
        runner.step_hook = self.before_step
        cache.write_pages = self.write_pages
        cache.loader.read = self.read_pages
        keep_plain = not engine.memory.release_plain_weights
        self._send(("init", runner.pages.shape[0], engine.config.block_tokens,
                    engine.config.prepack_weights, keep_plain, self.full_targets))
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for rank, conn in enumerate(self.conns, start=1):
            while not conn.poll(POLL_S):
                self._check_alive()
                if time.monotonic() > deadline:
                    self._fail(f"worker {rank} was not ready after {STARTUP_TIMEOUT_S:.0f} s")
            conn.recv()
        self.comm.barrier(runner.device)     # NCCL makes its communicator here, not mid-step

    def read_pages(self, spec, path, dtype) -> torch.Tensor:
        """The loader's read (its thread): every rank's shard of the adapter, side by side."""
        return shard_pages(spec.modules, file_pages(spec, path, dtype), self.plans)

    def shard_host(self, host):
        """An adapter registered from tensors: its page copy made into every rank's shards."""
        host.pages = shard_pages(host.spec.modules, host.pages, self.plans)
        return host

    def write_pages(self, page_ids: list[int], pages: torch.Tensor) -> None:
        """pages [n, N * H]: rank r's in columns [r * H, (r + 1) * H)."""
        size = pages.shape[1] // self.world
        for rank, conn in enumerate(self.conns, start=1):
            self._send_to(conn, ("write", list(page_ids),
                                 pages[:, rank * size:(rank + 1) * size].cpu().contiguous()))
        self.stats.page_bytes += pages.shape[0] * size * pages.element_size()
        self.runner.write_pages(page_ids, pages[:, :size])

    def before_step(self, inputs: StepInputs) -> None:
        self._check_alive()
        for name in dict.fromkeys(n for n, _ in inputs.runs if n is not None):
            key = (name, self.cache.load_id[name])
            if key not in self._sent:
                self._sent = {k for k in self._sent if self.cache.load_id.get(k[0]) == k[1]}
                self._sent.add(key)
                self._send(("adapter", name, key[1], list(self.cache.resident[name]),
                            self.cache.host[name].modules))
        message = _dumps(("step", inputs))          # pickled once for all workers
        self.stats.steps += 1
        self.stats.control_bytes += len(message)
        self._send(message)

    # ---- failures and shutdown --------------------------------------------------------------

    def _send(self, message) -> None:
        """To every worker (message as for `_send_to`)."""
        if not isinstance(message, bytes):
            message = _dumps(message)           # pickled once, not once per worker
        for conn in self.conns:
            self._send_to(conn, message)

    def _send_to(self, conn, message) -> None:
        """message: a tuple, or one pickled already (the worker's recv() unpickles it)."""
        if self.failed:
            raise EngineError(self.failed)
        try:
            conn.send_bytes(message if isinstance(message, bytes) else _dumps(message))
        except (OSError, ValueError) as exc:
            self._fail(f"could not reach a worker ({exc})")

    def _check_alive(self) -> None:
        if self.failed:
            raise EngineError(self.failed)
        for rank, proc in enumerate(self.procs, start=1):
            if not proc.is_alive():
                self._fail(f"worker {rank} exited with code {proc.exitcode}")

    def failure(self) -> str:
        """Why the group is broken (marks it broken if a worker is found dead now)."""
        try:
            self._check_alive()
        except EngineError as exc:
            return str(exc)
        return "tensor parallelism: no failure"

    def _fail(self, what: str) -> None:
        """Mark the group broken (the engine then fails every request) and raise."""
        if self.failed is None:
            for proc in self.procs:
                proc.join(timeout=1.0)          # reap a worker that is exiting
            dead = [f"worker {rank} exited with code {proc.exitcode}"
                    for rank, proc in enumerate(self.procs, start=1) if not proc.is_alive()]
            if dead and not what.startswith("worker"):
                what = f"{what}: {', '.join(dead)}"
            errors = []
            while True:
                try:
                    errors.append("rank %d: %s" % self.errors.get(timeout=0.2))
                except queue.Empty:
                    break
            detail = f"; {' | '.join(errors)}" if errors else ""
            self.failed = (f"tensor parallelism: {what}{detail}; the engine cannot serve "
                           f"(restart it)")
            log.error("%s", self.failed)
        raise EngineError(self.failed)

    def close(self) -> None:
        self._finalizer()

    def healthy(self) -> bool:
        return self.failed is None and all(p.is_alive() for p in self.procs)


def _dumps(message) -> bytes:
    """Plain pickle, tensors by value: torch.multiprocessing's default would pass tensors as
    shared-memory file descriptors fetched from this process on receipt (one more thing that
    can fail under load, and no gain for adapter pages of a few MB)."""
    return pickle.dumps(message, pickle.HIGHEST_PROTOCOL)


def _stop(conns, procs) -> None:
    for conn in conns:
        try:
            conn.send(("stop",))
        except (OSError, ValueError):
            pass                      # already gone
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)
    for conn in conns:
        conn.close()


# ---- the worker process -----------------------------------------------------------------------

def worker_main(rank: int, world: int, port: int, source, dtype, device: str, timeout_s: float,
                threads: int, conn, errors, quantize: str | None = None,
                vocab: str = "replicated") -> None:
    try:
        torch.set_num_threads(threads)
        _worker_loop(rank, world, port, source, dtype, device, timeout_s, conn, quantize, vocab)
    except EOFError:              # the engine closed its end: shut down quietly
        return
    except BaseException as exc:  # noqa: BLE001 -- reported to rank 0, then this rank exits
        errors.put((rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"))
        raise SystemExit(1) from None


def _worker_loop(rank, world, port, source, dtype, device, timeout_s, conn, quantize,
                 vocab) -> None:
    from lorafleet.models import load_model

    device = rank_device(device, rank)
    store = dist.TCPStore("127.0.0.1", port, world, False,
                          datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
    group = new_group(store, rank, world, device, timeout_s)   # first: rank 0 waits for it
    comm = Collectives(group, rank, world, timeout_s)
    model = source if isinstance(source, torch.nn.Module) else load_model(source, dtype=dtype,
                                                                          device=device)
    parent = os.getppid()
    message = _receive(conn, parent)
    _, num_pages, block_tokens, prepack, keep_plain, full_targets = message
    shard_model(model, rank, world, comm.all_reduce, quantize, vocab, comm.gather)
    runner = ModelRunner(model, num_pages, block_tokens, prepack, keep_plain_weights=keep_plain)
    mirror = SimpleNamespace(load_id={}, host={}, resident={})
    runner.attach(mirror, ShardedLoraBatchBuilder(runner.pages, mirror, runner.targets,
                                                  full_targets))
    conn.send(("ready", rank))
    comm.barrier(runner.device)
    while True:
        message = _receive(conn, parent)
        kind = message[0]
        if kind == "stop":
            return
        if kind == "write":
            runner.write_pages(message[1], message[2])
        elif kind == "adapter":
            _, name, load_id, page_ids, modules = message
            mirror.load_id[name] = load_id
            mirror.resident[name] = page_ids
            mirror.host[name] = SimpleNamespace(modules=modules)
        elif kind == "step":
            inputs = message[1]
            if vocab == "replicated":         # rank 0 alone computes logits and samples
                inputs.logits_indices = []
            runner.execute(inputs)


def _receive(conn, parent: int):
    """The next message; EOFError once the engine process is gone."""
    while not conn.poll(POLL_S):
        if os.getppid() != parent:
            raise EOFError
    return conn.recv()
