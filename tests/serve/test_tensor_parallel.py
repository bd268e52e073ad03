"""Tensor-parallel serving (serve/parallel.py, serve/shard.py): two gloo processes on this
machine, float32, must give every request the same greedy tokens as the single-process engine
and as transformers + PEFT (merged), with adapters of mixed ranks on a Llama with GQA (KV heads
split across ranks) and a Qwen2 with qkv bias, one KV head (replicated on both ranks) and tied
embeddings over an odd vocabulary (385 rows: uneven halves when split by vocabulary)."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from hf_fixtures import make_checkpoint
from serve_process import serve_subprocess
from lorafleet.errors import ConfigError, EngineError
from lorafleet.serve.engine import Engine, EngineConfig, SamplingParams
from lorafleet.serve.shard import Shard, VocabParallelEmbedding, shard_pages, vocab_shard

from .conftest import LLAMA_TARGETS, RANKS, make_peft_adapter, merged_oracle, oracle_greedy
from .test_engine import _run, _workload

NUM_ADAPTERS = 12
MAX_TOKENS = 5


def _fleet(root, kind, **overrides):
    base = make_checkpoint(root / "base", kind, seed=3, **overrides)
    adapters = {}
    for i in range(NUM_ADAPTERS):
        kwargs = {"use_rslora": True} if i % 5 == 2 else {}
        adapters[f"t{i:02d}"] = make_peft_adapter(
            base, root / f"t{i:02d}", RANKS[i % len(RANKS)], LLAMA_TARGETS[i % 4], seed=200 + i,
            **kwargs)
    return root / "base", base, adapters


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tp_fleet(request, tmp_path_factory):
    """(checkpoint, adapters, workload, oracle tokens) for a Llama (4 heads, 2 KV heads) and a
    Qwen2 (qkv bias, 4 heads, 1 KV head, tied embeddings, vocabulary 385)."""
    root = tmp_path_factory.mktemp(f"tp_{request.param}")
    overrides = ({"num_key_value_heads": 1, "vocab_size": 385, "tie_word_embeddings": True}
                 if request.param == "qwen2" else {})
    base_dir, base, adapters = _fleet(root, request.param, **overrides)
    workload = _workload(adapters, num_base=3, seed=5)
    merged = {name: merged_oracle(base, path) for name, path in adapters.items()}
    expected = {rid: oracle_greedy(base if name is None else merged[name], prompt, MAX_TOKENS)
                for rid, prompt, name in workload}
    return base_dir, adapters, workload, expected


def _engine(base_dir, adapters, **config):
    engine = Engine(base_dir, config=EngineConfig(**config))
    for name, path in adapters.items():
        engine.register_adapter(name, path, lazy=True)
    return engine


@pytest.mark.parametrize("chunked", [True, False])
def test_two_ranks_match_single_process_and_peft(tp_fleet, chunked):
    base_dir, adapters, workload, expected = tp_fleet
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    config = dict(enable_chunked_prefill=chunked, max_num_batched_tokens=24 if chunked else 2048)
    single = _engine(base_dir, adapters, **config)
    tokens_1, _ = _run(single, workload, params)
    parallel = _engine(base_dir, adapters, tensor_parallel_size=2, **config)
    try:
        tokens_2, finished = _run(parallel, workload, params)
        assert all(out.error is None for out in finished.values())
        assert tokens_2 == tokens_1
        assert tokens_2 == expected
        stats = parallel.stats()
        # two row-parallel projections per layer, each one all-reduce per step (and the
        # embedding's when it is split by vocabulary)
        embedding = parallel.config.tensor_parallel_vocab == "sharded"
        assert stats["allreduce_calls"] == (2 * 2 + embedding) * parallel.num_steps
        assert parallel.healthy()
    finally:
        parallel.close()


@pytest.mark.parametrize("vocab", ["replicated", "lm_head", "sharded"])
def test_vocab_split_same_tokens(tp_fleet, vocab):
    """Embedding and lm_head replicated, or split by vocabulary rows (lm_head only, or both):
    the same greedy tokens as transformers + PEFT, on the Qwen2 fleet with tied embeddings and
    385 rows (193 + 192); the logits gathered to rank 0 once per step that samples, one more
    all-reduce per step with the embedding split."""
    base_dir, adapters, workload, expected = tp_fleet
    parallel = _engine(base_dir, adapters, tensor_parallel_size=2, tensor_parallel_vocab=vocab,
                       max_num_batched_tokens=24)
    try:
        tokens, _ = _run(parallel, workload, SamplingParams(max_tokens=MAX_TOKENS,
                                                            ignore_eos=True))
        assert tokens == expected
        vocab_size = parallel.model.config.vocab_size
        rows = vocab_shard(vocab_size, 0, 2)
        head, embed = parallel.model.lm_head, parallel.model.model.embed_tokens
        assert head.out_features == (vocab_size if vocab == "replicated" else rows.end)
        assert embed.weight.shape[0] == (rows.end if vocab == "sharded" else vocab_size)
        stats = parallel.stats()
        steps = parallel.num_steps
        assert stats["allreduce_calls"] == (2 * 2 + (vocab == "sharded")) * steps
        if vocab == "replicated":
            assert stats["gather_calls"] == 0
        else:       # steps that only run middle chunks of prompts sample nothing: no gather
            assert 0 < stats["gather_calls"] <= steps
            row_bytes = 2 * rows.end * 4                    # both ranks' padded slices, fp32
            assert stats["gather_tensor_bytes"] % row_bytes == 0
    finally:
        parallel.close()


def test_vocab_parallel_embedding_three_ranks():
    """VocabParallelEmbedding: 10 rows over 3 ranks (4, 4, 2); the sum over ranks (what the
    all-reduce computes) equals the whole table's lookup, ids at every boundary."""
    table = torch.randn(10, 6)
    ids = torch.tensor([[0, 3, 4, 7, 8, 9, 5, 0]])
    parts = []
    for rank in range(3):
        rows = vocab_shard(10, rank, 3)
        module = VocabParallelEmbedding(table[rows.start:rows.end].clone(), rows.start,
                                        lambda t: None)
        parts.append(module(ids))
    assert [vocab_shard(10, r, 3).end - vocab_shard(10, r, 3).start for r in range(3)] == [4, 4, 2]
    torch.testing.assert_close(sum(parts), torch.nn.functional.embedding(ids, table))


def test_cuda_needs_a_gpu_per_rank(tp_fleet, monkeypatch):
    """On CUDA rank r runs on cuda:r: fewer visible GPUs than ranks, or rank 0 asked on another
    GPU, is a ConfigError before anything loads (CUDA faked present: this machine has none)."""
    import torch.distributed as dist

    base_dir, _, _, _ = tp_fleet
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    with pytest.raises(ConfigError, match="one GPU per rank .* 1 visible"):
        Engine(base_dir, config=EngineConfig(tensor_parallel_size=2, device="cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ConfigError, match="rank 0, this process, on cuda:0"):
        Engine(base_dir, config=EngineConfig(tensor_parallel_size=2, device="cuda:1"))
    with pytest.raises(ConfigError, match="tensor_parallel_vocab"):
        EngineConfig(tensor_parallel_vocab="columns")


def test_tiny_pool_evicts_adapters_same_tokens(tp_fleet):
    """A pool that holds few adapters: adapters are evicted and loaded again into reused pages
    (and KV pages reused for adapters) on every rank alike."""
    base_dir, adapters, workload, expected = tp_fleet
    parallel = _engine(base_dir, adapters, tensor_parallel_size=2, num_pages=420,
                       max_num_seqs=4)
    try:
        tokens, _ = _run(parallel, workload, SamplingParams(max_tokens=MAX_TOKENS,
                                                            ignore_eos=True))
        assert tokens == expected
        assert parallel.cache.evictions > 0
    finally:
        parallel.close()


def test_adapters_registered_from_tensors(tp_fleet):
    """register_adapter_tensors: the in-memory page copy is cut into every rank's shard too."""
    import json

    from safetensors.torch import load_file

    base_dir, adapters, workload, expected = tp_fleet
    parallel = Engine(base_dir, config=EngineConfig(tensor_parallel_size=2))
    try:
        for name, path in adapters.items():
            config = json.loads((path / "adapter_config.json").read_text())
            parallel.register_adapter_tensors(name, config,
                                              load_file(path / "adapter_model.safetensors"))
        tokens, _ = _run(parallel, workload, SamplingParams(max_tokens=MAX_TOKENS,
                                                            ignore_eos=True))
        assert tokens == expected
    finally:
        parallel.close()


def test_nf4_each_rank_quantizes_its_shard(tp_fleet):
    """--quantize nf4 under tensor parallelism: each rank quantizes its own shard. Oracle: one
    process serving the float model whose weights are those shards dequantized, put together."""
    from lorafleet.models import load_model
    from lorafleet.quant.linear4bit import Linear4bit
    from lorafleet.serve.shard import shard_model, shard_plan

    base_dir, adapters, workload, _ = tp_fleet
    reference = load_model(base_dir, dtype=torch.float32)
    for rank in range(2):
        part = load_model(base_dir, dtype=torch.float32)
        shard_model(part, rank, 2, lambda t: None, quantize="nf4")
        for name, shard in shard_plan(reference.config, rank, 2).items():
            layer = part.get_submodule(name).base_layer
            assert isinstance(layer, Linear4bit)
            weight = reference.get_submodule(name).weight
            with torch.no_grad():
                if shard.kind == "column":
                    weight[shard.start:shard.end] = layer.weight
                else:
                    weight[:, shard.start:shard.end] = layer.weight
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    single = Engine(reference, config=EngineConfig())
    for name, path in adapters.items():
        single.register_adapter(name, path, lazy=True)
    expected, _ = _run(single, workload, params)
    parallel = _engine(base_dir, adapters, tensor_parallel_size=2, quantize="nf4")
    try:
        assert isinstance(parallel.model.model.layers[0].mlp.down_proj.base_layer, Linear4bit)
        tokens, _ = _run(parallel, workload, params)
        assert tokens == expected
    finally:
        parallel.close()


def test_idle_longer_than_the_collective_timeout(tp_fleet):
    """Workers wait for steps on a pipe, not in a collective: an engine idle for longer than
    tensor_parallel_timeout_s still serves."""
    base_dir, adapters, workload, expected = tp_fleet
    parallel = _engine(base_dir, adapters, tensor_parallel_size=2, tensor_parallel_timeout_s=1)
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
        first, _ = _run(parallel, workload[:2], params)
        time.sleep(2.5)
        second, _ = _run(parallel, workload[2:5], params)
        assert {**first, **second} == {rid: expected[rid] for rid, *_ in workload[:5]}
        assert parallel.healthy()
    finally:
        parallel.close()


def test_killed_worker_fails_requests_not_a_hang(tp_fleet):
    """A worker killed mid-generation: the step that meets it raises EngineError or fails the
    requests; within seconds every request has finished with an error naming the worker, the
    engine reports unhealthy and refuses new requests."""
    base_dir, adapters, workload, _ = tp_fleet
    parallel = _engine(base_dir, adapters, tensor_parallel_size=2, tensor_parallel_timeout_s=20,
                       max_num_seqs=2)
    try:
        for rid, prompt, name in workload[:5]:
            parallel.add_request(rid, prompt, name, SamplingParams(max_tokens=8))
        parallel.step()
        os.kill(parallel.parallel.procs[0].pid, signal.SIGKILL)
        started, errors, raised = time.monotonic(), {}, 0
        while parallel.has_work():
            assert time.monotonic() - started < 30, "a dead worker hung the engine"
            try:
                outputs = parallel.step()
            except EngineError as exc:
                assert "worker 1" in str(exc)
                raised += 1
                outputs = parallel.fail_running(str(exc))      # as AsyncEngine does
            errors.update((out.request_id, out.error) for out in outputs if out.finished)
        assert raised <= 1
        assert sorted(errors) == sorted(rid for rid, *_ in workload[:5])
        assert all("worker 1 exited" in e or "worker 1" in e for e in errors.values()), errors
        assert not parallel.healthy()
        with pytest.raises(EngineError, match="worker 1"):
            parallel.add_request("late", [5, 6, 7])
    finally:
        parallel.close()


def test_stalled_worker_times_out_the_collective(tp_fleet):
    """A worker alive but stuck (SIGSTOP): rank 0's all-reduce gives up after
    tensor_parallel_timeout_s with EngineError, and the engine fails its requests."""
    base_dir, adapters, workload, _ = tp_fleet
    parallel = _engine(base_dir, adapters, tensor_parallel_size=2, tensor_parallel_timeout_s=3)
    worker = parallel.parallel.procs[0]
    try:
        for rid, prompt, name in workload[:3]:
            parallel.add_request(rid, prompt, name, SamplingParams(max_tokens=8))
        parallel.step()
        os.kill(worker.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(EngineError, match="all-reduce failed"):
            parallel.step()
        assert time.monotonic() - started < 20
        assert not parallel.healthy()
        failed = parallel.fail_running("stalled")
        failed += parallel.step()            # the rest: finished with the failure
        assert not parallel.has_work() and all(out.error for out in failed)
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        parallel.close()


def test_bad_sizes_are_refused_at_start(tp_fleet, gpt2_dir, monkeypatch):
    base_dir, adapters, _, _ = tp_fleet
    with pytest.raises(ConfigError, match="does not divide num_attention_heads 4"):
        Engine(base_dir, config=EngineConfig(tensor_parallel_size=3))
    with pytest.raises(ConfigError, match="CPU cores"):   # 4 heads: 4 ranks divide them
        monkeypatch.setattr(os, "cpu_count", lambda: 2)
        Engine(base_dir, config=EngineConfig(tensor_parallel_size=4))
    with pytest.raises(ConfigError, match="c_attn"):
        Engine(gpt2_dir, config=EngineConfig(tensor_parallel_size=2))
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)


def test_shard_pages_splits_the_matching_halves():
    """Column-parallel: B^T's output columns split, A whole; row-parallel: A's input columns
    split, B^T whole; each rank's part first in its row's pages, zero-padded."""
    from lorafleet.serve.adapter_registry import ModuleSlice

    H = 4
    col = ModuleSlice(rank=2, in_features=4, out_features=8, scaling=1.0, a_page=0,
                      a_pages_per_row=1, b_page=2, b_pages_per_row=2)
    row = ModuleSlice(rank=1, in_features=8, out_features=4, scaling=1.0, a_page=6,
                      a_pages_per_row=2, b_page=8, b_pages_per_row=1)
    pages = torch.arange(9 * H, dtype=torch.float32).view(9, H)
    plans = [{"c": Shard("column", 0, 4), "r": Shard("row", 0, 4)},
             {"c": Shard("column", 4, 8), "r": Shard("row", 4, 8)}]
    out = shard_pages({"c": col, "r": row}, pages, plans).view(9, 2, H)
    for rank in range(2):
        got = out[:, rank]
        torch.testing.assert_close(got[0:2], pages[0:2])            # A of "c": replicated
        bt = pages[2:6].reshape(2, 8)[:, rank * 4:(rank + 1) * 4]
        torch.testing.assert_close(got[2:6].reshape(2, 8)[:, :4], bt)
        assert not got[2:6].reshape(2, 8)[:, 4:].any()
        a = pages[6:8].reshape(1, 8)[:, rank * 4:(rank + 1) * 4]
        torch.testing.assert_close(got[6:8].reshape(1, 8)[:, :4], a)
        torch.testing.assert_close(got[8], pages[8])                # B^T of "r": replicated


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


@pytest.mark.slow
def test_serve_cli_tensor_parallel_with_openai_client(tp_fleet, tmp_path):
    """`lorafleet serve --tensor-parallel-size 2` answers the openai client with the
    single-process engine's greedy text; a killed worker turns /health unhealthy and requests
    into errors, not a hang."""
    import re

    import httpx
    import openai

    base_dir, adapters, _, _ = tp_fleet
    if "qwen2" in str(base_dir):
        pytest.skip("one model family is enough through the CLI")
    names = ["t00", "t03", "t07"]
    single = _engine(base_dir, {n: adapters[n] for n in names})
    prompts = ["the quick brown fox", "hello world"]
    params = SamplingParams(max_tokens=8, temperature=0)
    expected = {(n, p): single.generate([p], [n], params)[0].text
                for n in [*names, None] for p in prompts}
    log_path = tmp_path / "serve.log"
    with serve_subprocess(
            ["--model", str(base_dir), "--served-model-name", "tiny", "--port", "0",
             "--num-pages", "2048", "--dtype", "float32", "--tensor-parallel-size", "2",
             *[f"--adapter={n}={adapters[n]}" for n in names]],
            log_path, 120, poll_s=0.2) as proc:
        url = proc.url
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                               timeout=60)
        for (name, prompt), text in expected.items():
            out = client.completions.create(model=name or "tiny", prompt=prompt, max_tokens=8,
                                            temperature=0)
            assert out.choices[0].text == text, (name, prompt)
        workers = [pid for pid in _children(proc.pid)       # spawned workers, not the
                   if "spawn_main" in open(f"/proc/{pid}/cmdline").read()]  # resource tracker
        assert workers, "no tensor-parallel worker process found"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(openai.APIError):
            client.completions.create(model="t00", prompt="the quick", max_tokens=8,
                                      temperature=0)
        assert time.monotonic() - started < 30
        health = httpx.get(url + "/health", timeout=5)
        assert health.status_code == 503 and "worker" in health.text, health.text
