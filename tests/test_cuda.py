"""CUDA paths, run where a GPU is present (skipped on the CPU-only CI machine): the same model,
LoRA, NF4 and engine code on `cuda` must give what it gives on the CPU."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _adapter(tmp_path, hf_model, name, seed):
    import peft

    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False)
    peft_model = peft.get_peft_model(hf_model, config)
    path = tmp_path / name
    peft_model.save_pretrained(path)
    peft_model.unload()
    return path


def test_model_logits_cuda_equal_cpu(llama_dir):
    from lorafleet.models import load_model

    ids = torch.randint(0, 384, (2, 12))
    cpu = load_model(llama_dir)(ids)
    gpu = load_model(llama_dir, device="cuda")(ids.cuda())
    torch.testing.assert_close(gpu.float().cpu(), cpu, atol=1e-3, rtol=1e-3)


def test_nf4_linear_cuda_equal_cpu():
    from lorafleet.quant import quantize_nf4

    weight = torch.randn(256, 128)
    q = quantize_nf4(weight)
    expected = q.dequantize(torch.float32)
    got = quantize_nf4(weight.cuda()).dequantize(torch.float32).cpu()
    torch.testing.assert_close(got, expected)


def test_engine_cuda_equals_cpu(tmp_path, llama_dir):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from hf_fixtures import make_checkpoint

    from lorafleet.models import load_model, load_tokenizer
    from lorafleet.serve import Engine, EngineConfig, SamplingParams

    hf = make_checkpoint(tmp_path / "base", "llama")
    adapters = {f"a{i}": _adapter(tmp_path, hf, f"a{i}", i) for i in range(3)}
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]
    names = ["a0", None, "a1", "a2"]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    results = {}
    for device in ("cpu", "cuda"):
        model = load_model(tmp_path / "base", device=device)
        engine = Engine(model, load_tokenizer(tmp_path / "base"),
                        EngineConfig(num_pages=512, device=device))
        for name, path in adapters.items():
            engine.register_adapter(name, path)
        results[device] = [c.token_ids for c in engine.generate(prompts, names, params)]
    assert results["cuda"] == results["cpu"]


def _sgmv_case(dtype, runs, in_features=320, out_features=200, seed=0):
    """A paged module on the GPU (hidden 128: 3 pages per A row, 2 per B^T row, partial last
    pages), x and y, and the paged reference's y. -> (y, x, pages, module, expected, rows that
    must keep their bits)."""
    from lorafleet.serve.lora_ops import lora_delta_paged_reference

    from .serve.test_triton_ops import make_module, untouched_rows

    device = torch.device("cuda")
    module, pages, num_rows = make_module(in_features, out_features, runs, seed=seed,
                                          dtype=dtype, hidden=128)
    for name in ("seg_rows", "seg_rank", "seg_scale", "seg_a", "seg_b", "page_ids"):
        setattr(module, name, getattr(module, name).to(device))
    pages = pages.to(device)
    x = torch.randn(num_rows, in_features, device=device).to(dtype)
    y = torch.randn(num_rows, out_features, device=device).to(dtype)
    rows = untouched_rows(module, num_rows)
    y[rows, ::3] = -0.0
    expected = y.clone()
    lora_delta_paged_reference(expected, x, pages, module)
    return y, x, pages, module, expected, rows


def _tolerance(dtype):
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sgmv_triton_cuda_equals_paged_reference(dtype):
    """The compiled Triton SGMV kernels (tensor-core dots, split-K atomics) on the GPU equal
    the paged reference: mixed ranks up to 64, a 300-row prefill segment among decode rows,
    3 pages per row with a partial last page; base rows and a rank-0 segment keep their bits."""
    pytest.importorskip("triton")
    from lorafleet.serve.triton_ops import sgmv_triton, triton_available

    from .serve.test_triton_ops import assert_bits_equal

    assert triton_available(torch.device("cuda"))
    runs = [(8, 1), (None, 2), (64, 300), (1, 1), (16, 1), (None, 5), (0, 3), (33, 7), (4, 1)]
    y, x, pages, module, expected, rows = _sgmv_case(dtype, runs)
    for split_k in (None, 1, 3):
        got = y.clone()
        sgmv_triton(got, x, pages, module, split_k=split_k)
        torch.testing.assert_close(got.float(), expected.float(), **_tolerance(dtype))
        assert rows
        assert_bits_equal(got[rows], y[rows])


def test_sgmv_triton_cuda_offsets_past_int32():
    """A pool of 2^31+ elements with the adapter on its top pages, and x / y with column
    strides past 2^31 elements: int64 addressing on the GPU (2 x 4.3 GB reserved)."""
    pytest.importorskip("triton")
    from lorafleet.serve.triton_ops import sgmv_triton

    from .serve.test_triton_ops import past_int32_case

    y, x, pages, module, y_before, expected = past_int32_case(torch.bfloat16, "cuda")
    for split_k in (None, 1, 3):
        y.copy_(y_before)
        sgmv_triton(y, x, pages, module, split_k=split_k)
        torch.testing.assert_close(y.contiguous().float(), expected.float(), atol=2e-2,
                                   rtol=1e-2)


def test_sgmv_triton_cuda_graph_and_one_compile_per_shape(monkeypatch):
    """sgmv_triton reads no device value (it can be captured in a CUDA graph, which fails on a
    host sync), and another split_k > 1 is no new JIT compile (it follows the number of decode
    segments from step to step)."""
    pytest.importorskip("triton")
    import triton

    from lorafleet.serve.triton_ops import sgmv_triton

    runs = [(8, 1), (None, 2), (16, 1), (0, 1), (4, 1)]
    y, x, pages, module, expected, _ = _sgmv_case(torch.bfloat16, runs, in_features=2048)
    sgmv_triton(y.clone(), x, pages, module, split_k=2)   # compile and load the kernels
    compiles = []

    def count(**kwargs):   # called by the JIT before each compile; False: go on compiling
        compiles.append(kwargs["repr"])
        return False

    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", count)
    for split_k in (3, 5, 6, 7):
        got = y.clone()
        sgmv_triton(got, x, pages, module, split_k=split_k)
        torch.testing.assert_close(got.float(), expected.float(), **_tolerance(torch.bfloat16))
    assert compiles == []

    graph, static_y = torch.cuda.CUDAGraph(), y.clone()
    with torch.cuda.graph(graph):
        sgmv_triton(static_y, x, pages, module, split_k=2)
    static_y.copy_(y)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_y.float(), expected.float(), **_tolerance(torch.bfloat16))


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                              reason="tensor parallelism on CUDA needs 2 GPUs")


def _tp_fleet(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from hf_fixtures import make_checkpoint

    hf = make_checkpoint(tmp_path / "base", "llama", vocab_size=385)    # odd: uneven halves
    adapters = {f"a{i}": _adapter(tmp_path, hf, f"a{i}", i) for i in range(3)}
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18], [19, 20, 21]]
    return tmp_path / "base", adapters, prompts, ["a0", None, "a1", "a2", "a0"]


def _tp_engine(base, adapters, **config):
    from lorafleet.serve import Engine, EngineConfig

    engine = Engine(base, config=EngineConfig(num_pages=512, device="cuda", dtype="float32",
                                              **config))
    for name, path in adapters.items():
        engine.register_adapter(name, path)
    return engine


@two_gpus
@pytest.mark.parametrize("vocab", ["replicated", "lm_head", "sharded"])
def test_tensor_parallel_nccl_equals_one_gpu(tmp_path, vocab):
    """Two ranks over NCCL (rank r on cuda:r), float32: every request's greedy tokens equal the
    single-GPU engine's; two all-reduces per layer per step (one more with the embedding split
    by vocabulary), the logits gathered to rank 0 when lm_head is split."""
    from lorafleet.serve import SamplingParams

    base, adapters, prompts, names = _tp_fleet(tmp_path)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    single = _tp_engine(base, adapters)
    expected = [c.token_ids for c in single.generate(prompts, names, params)]
    parallel = _tp_engine(base, adapters, tensor_parallel_size=2, tensor_parallel_vocab=vocab)
    try:
        assert parallel.runner.device == torch.device("cuda", 0)
        got = [c.token_ids for c in parallel.generate(prompts, names, params)]
        assert got == expected
        stats = parallel.stats()
        layers = parallel.model.config.num_hidden_layers
        assert stats["allreduce_calls"] == (2 * layers + (vocab == "sharded")) * parallel.num_steps
        assert (stats["gather_calls"] > 0) == (vocab != "replicated")
        assert parallel.healthy()
    finally:
        parallel.close()


@two_gpus
def test_tensor_parallel_nccl_killed_worker_is_an_error(tmp_path):
    """A worker killed between steps: the next step finishes every request with an error
    naming it (the liveness check before the step, never an NCCL collective waiting on a dead
    rank); unhealthy after, new requests refused."""
    import os
    import signal

    from lorafleet.errors import EngineError
    from lorafleet.serve import SamplingParams

    base, adapters, prompts, names = _tp_fleet(tmp_path)
    parallel = _tp_engine(base, adapters, tensor_parallel_size=2, tensor_parallel_timeout_s=20)
    try:
        for i, (prompt, name) in enumerate(zip(prompts, names)):
            parallel.add_request(f"r{i}", prompt, name, SamplingParams(max_tokens=8))
        parallel.step()
        os.kill(parallel.parallel.procs[0].pid, signal.SIGKILL)
        parallel.parallel.procs[0].join(10)
        outputs = parallel.step()
        assert sorted(o.request_id for o in outputs) == [f"r{i}" for i in range(len(prompts))]
        assert all(o.finished and "worker 1" in o.error for o in outputs)
        assert not parallel.healthy()
        with pytest.raises(EngineError, match="worker 1"):
            parallel.add_request("late", [5, 6, 7])
    finally:
        parallel.close()


def test_tensor_parallel_more_ranks_than_gpus_refused(tmp_path):
    """More ranks than visible GPUs (a power of two that divides the model's 16 heads): a
    ConfigError naming the count, before anything loads."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from hf_fixtures import make_checkpoint

    from lorafleet.errors import ConfigError
    from lorafleet.serve import Engine, EngineConfig

    count = torch.cuda.device_count()
    make_checkpoint(tmp_path / "base", "llama", num_attention_heads=16, num_key_value_heads=16)
    with pytest.raises(ConfigError, match=f"{count} visible"):
        Engine(tmp_path / "base", config=EngineConfig(tensor_parallel_size=1 << count.bit_length(),
                                                      device="cuda"))


# ---- adapter pages copied on a side stream (serve/page_copy.py) -----------------------------
# torch.cuda._sleep holds a stream busy for a number of GPU cycles (~0.1-0.5 s at 1-2 GHz), so
# an ordering the copier forgot shows up as the wrong values, not as a race that rarely loses.
SLEEP_CYCLES = 500_000_000


def _copy_setup(num_pages=16, hidden=8):
    from types import SimpleNamespace

    from lorafleet.serve.page_copy import CudaPageCopier, make_page_copier
    from lorafleet.serve.runner import ModelRunner

    pool = torch.zeros(num_pages, hidden, device="cuda")
    copier = make_page_copier(pool.device)
    assert isinstance(copier, CudaPageCopier)
    runner = SimpleNamespace(pages=pool, device=pool.device, dtype=pool.dtype)

    def write(page_ids, pages):      # the runner's own writer, on a pool of our own
        ModelRunner.write_pages(runner, page_ids, pages)

    return pool, copier, write


def test_page_copy_waits_for_compute_reading_the_pages():
    import time

    pool, copier, write = _copy_setup()
    page_ids = [3, 7, 1]
    pool[page_ids] = 1.0
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)                  # a long step on the compute stream ...
    seen = pool[page_ids].clone()                    # ... that reads the pages at its end
    new = copier.stage(torch.full((3, pool.shape[1]), 2.0))
    assert new.is_pinned()
    started = time.perf_counter()
    copier.copy("a", page_ids, new, write)           # the pages were freed and reused
    issued = time.perf_counter() - started
    assert copier.pending == 1
    torch.cuda.synchronize()
    assert (seen == 1.0).all(), "the copy overwrote pages a running step still read"
    assert (pool[page_ids] == 2.0).all()
    assert issued < 0.05, f"issuing the copy blocked the host for {issued:.3f} s"
    copier.collect()
    assert copier.pending == 0


def test_first_step_waits_for_the_copy_and_staging_lives_until_it_ran():
    import gc
    import weakref

    pool, copier, write = _copy_setup()
    page_ids = [2, 5]
    with torch.cuda.stream(copier.stream):
        torch.cuda._sleep(SLEEP_CYCLES)              # the copy stream is busy for a while
    staged = copier.stage(torch.full((2, pool.shape[1]), 3.0))
    ref = weakref.ref(staged)
    copier.copy("a", page_ids, staged, write)
    del staged
    gc.collect()
    copier.collect()
    assert ref() is not None and copier.pending == 1    # the copy has not run: kept alive
    copier.before_use("a")                           # the step that reads the adapter
    got = pool[page_ids].clone()
    torch.cuda.synchronize()
    assert (got == 3.0).all(), "a step read the adapter's pages before their copy"
    copier.collect()
    gc.collect()
    assert ref() is None and copier.pending == 0


def test_evicted_copy_lands_before_the_pages_are_reused():
    pool, copier, write = _copy_setup()
    page_ids = [4, 9]
    with torch.cuda.stream(copier.stream):
        torch.cuda._sleep(SLEEP_CYCLES)
    copier.copy("a", page_ids, copier.stage(torch.full((2, pool.shape[1]), 5.0)), write)
    copier.freed("a")                                # evicted, never used
    pool[page_ids] = -1.0                            # the KV cache takes the pages
    torch.cuda.synchronize()
    assert (pool[page_ids] == -1.0).all(), "the copy landed on pages already reused"


def test_engine_cuda_lazy_adapters_under_eviction_equal_cpu_and_peft(tmp_path):
    """Adapters registered lazily from a store, a pool that holds about two of them beside the
    KV: loads and evictions every few steps, copies on the side stream. Every request's greedy
    tokens equal the CPU engine's and transformers + PEFT's with its adapter alone."""
    import random
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from hf_fixtures import make_checkpoint

    from lorafleet.serve import Engine, EngineConfig, SamplingParams
    from lorafleet.serve.page_copy import CudaPageCopier

    from .serve.conftest import make_peft_adapter, merged_oracle, oracle_greedy

    base = make_checkpoint(tmp_path / "base", "llama", seed=1)
    store = tmp_path / "store"
    targets = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"],
               ["gate_proj", "up_proj", "down_proj"]]
    for i in range(10):
        make_peft_adapter(base, store / f"s{i}", [2, 4, 8][i % 3], targets[i % 3], seed=300 + i)
    rng = random.Random(11)
    workload = [(f"r{i}", [rng.randrange(4, 380) for _ in range(rng.randint(2, 9))],
                 None if i % 7 == 6 else f"s{rng.randrange(10)}") for i in range(30)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    results, stats = {}, {}
    for device in ("cpu", "cuda"):
        engine = Engine(tmp_path / "base", config=EngineConfig(
            num_pages=300, block_tokens=4, max_num_seqs=4, dtype="float32", device=device,
            max_adapters_per_step=2))
        engine.register_store(store)
        for request_id, prompt, name in workload:
            engine.add_request(request_id, prompt, name, params)
        tokens = {}
        while engine.has_work():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                assert out.error is None, out.error
            engine.pool.check()
        results[device], stats[device] = tokens, engine.stats()
        assert engine.pool.used_by["kv"] == 0
        if device == "cuda":
            assert isinstance(engine.cache.copier, CudaPageCopier)
            torch.cuda.synchronize()
            engine.cache.copier.collect()
            assert engine.cache.copier.pending == 0
    touched = {name for _, _, name in workload if name is not None}
    # On CPU this run makes 12 loads and 8 evictions; loader timing may move a few.
    assert stats["cuda"]["adapter_loads"] >= len(touched) and stats["cuda"]["cache_evictions"] >= 3
    assert results["cuda"] == results["cpu"]
    oracles = {}
    for request_id, prompt, name in workload:
        if name is not None and name not in oracles:
            oracles[name] = merged_oracle(base, store / name)
        model = base if name is None else oracles[name]
        assert results["cuda"][request_id] == oracle_greedy(model, prompt, 6), (request_id, name)
