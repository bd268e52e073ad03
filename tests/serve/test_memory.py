"""Sizing from memory (serve/memory.py): sizes parsed, one budget split between weights, packed
copies and the pool, and an engine built from it: default pool = the running batch's need,
capped by available memory with a warning; an explicit budget fills the pool with what the
weights leave; a budget too small says so; dtype "auto" picks bf16 where the CPU has it; a tight
budget releases the plain weights after prepacking, with the same tokens."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import lorafleet.models.dtype
from lorafleet.errors import ConfigError
from lorafleet.models import load_model
from lorafleet.serve import Engine, EngineConfig, SamplingParams
from lorafleet.serve.memory import (DEFAULT_MEMORY_FRACTION, DEFAULT_SEQ_TOKENS,
                                    available_memory, parse_memory_size, plan_memory,
                                    weight_bytes)
from lorafleet.serve.packed_linear import PackedLinear, can_prepack

GiB, MiB = 2**30, 2**20


@pytest.mark.parametrize("value, expected", [
    ("12GiB", 12 * GiB), ("512 MB", 512 * 10**6), ("1.5 gib", int(1.5 * GiB)), ("4096B", 4096),
    ("1e9", 10**9), ("64KiB", 64 * 1024), ("2KB", 2000), ("0.9", 0.9), (0.5, 0.5), (1, 1.0),
    (3 * GiB, 3 * GiB)])
def test_parse_memory_size(value, expected):
    parsed = parse_memory_size(value)
    assert parsed == expected and type(parsed) is type(expected)


@pytest.mark.parametrize("value", ["12 parsecs", "-1", "0", "GiB", "", "nan", True, -0.5, 0])
def test_parse_memory_size_refuses_naming_the_field(value):
    with pytest.raises(ConfigError, match="memory_budget"):
        parse_memory_size(value)
    with pytest.raises(ConfigError, match="memory_budget"):
        EngineConfig(memory_budget=value)


def test_available_memory_on_cpu():
    total = int(open("/proc/meminfo").readline().split()[1]) * 1024        # MemTotal, kB
    assert 0 < available_memory("cpu") <= total


PAGE = 2048


def _plan(**overrides):
    args = dict(page_bytes=PAGE, wanted_pages=1000, min_pages=10, weight_bytes=100 * MiB,
                packable_bytes=80 * MiB, available_bytes=10 * GiB)
    return plan_memory(**{**args, **overrides})


def test_default_takes_what_the_batch_needs_when_memory_allows():
    plan = _plan()
    assert plan.num_pages == 1000 and not plan.release_plain_weights
    assert plan.budget_bytes == int(DEFAULT_MEMORY_FRACTION * 10 * GiB)
    assert plan.total_bytes == 100 * MiB + 80 * MiB + 1000 * PAGE


def test_default_capped_by_available_memory_with_a_warning(caplog):
    # Room for weights + 600 pages only: packed copies replace the plain weights, pool smaller.
    available = int((100 * MiB + 600 * PAGE) / DEFAULT_MEMORY_FRACTION) + 1
    with caplog.at_level(logging.WARNING, logger="lorafleet.serve.memory"):
        plan = _plan(available_bytes=available)
    assert plan.release_plain_weights and plan.packed_bytes == 0
    assert plan.num_pages == 600
    assert plan.total_bytes <= DEFAULT_MEMORY_FRACTION * available
    assert "less than the 1000 pages" in caplog.text


def test_explicit_budget_fills_the_pool():
    plan = _plan(memory_budget=200 * MiB)                 # bytes: 100 left after weights
    assert not plan.release_plain_weights                  # 20 MiB left for pages >= wanted
    assert plan.num_pages == (20 * MiB) // PAGE and plan.total_bytes <= 200 * MiB
    plan = _plan(memory_budget=0.5, available_bytes=400 * MiB)       # a fraction: 200 MiB
    assert plan.budget_bytes == 200 * MiB and plan.num_pages == (20 * MiB) // PAGE
    plan = _plan(memory_budget="150MiB")                   # packed copies do not fit beside
    assert plan.release_plain_weights and plan.num_pages == (50 * MiB) // PAGE


def test_budget_too_small_is_a_clear_error():
    with pytest.raises(ConfigError, match="memory_budget.*nf4|weights"):
        _plan(memory_budget=100 * MiB + 5 * PAGE)          # 5 pages < min_pages
    with pytest.raises(ConfigError, match="fraction of available memory"):
        _plan(memory_budget=0.5, available_bytes=None)


def test_num_pages_overrides():
    plan = _plan(num_pages=123)
    assert plan.num_pages == 123 and plan.source == "num_pages"
    assert not plan.release_plain_weights


# ---- the engine -----------------------------------------------------------------------------

def test_engine_default_pool_holds_the_batch(small_fleet, caplog):
    base_dir = small_fleet[0]
    with caplog.at_level(logging.INFO, logger="lorafleet.serve.engine"):
        engine = Engine(base_dir, config=EngineConfig(max_num_seqs=8))
    layout = engine.runner.layout
    seq_tokens = min(DEFAULT_SEQ_TOKENS, engine.max_model_len)
    assert engine.memory.source == "default"
    assert engine.pool.num_pages == engine.memory.wanted_pages
    # KV of 8 sequences of seq_tokens fits beside the adapter room; all of it counted in bytes
    assert engine.pool.num_pages >= 8 * layout.pages_for_tokens(seq_tokens)
    stats = engine.stats()
    assert stats["pool_bytes"] == engine.pool.num_pages * engine.runner.page_bytes
    assert stats["kv_token_capacity"] >= 8 * seq_tokens
    assert stats["weight_bytes"] == weight_bytes(engine.model)
    assert f"{engine.pool.num_pages} pages" in caplog.text and "tokens of KV" in caplog.text


def test_engine_explicit_budget_and_too_small(small_fleet):
    base_dir = small_fleet[0]
    weights = weight_bytes(load_model(base_dir, dtype=torch.float32))
    engine = Engine(base_dir, config=EngineConfig(memory_budget=weights + 3 * MiB,
                                                  dtype="float32"))
    assert engine.memory.source == "memory_budget"
    assert engine.pool.num_pages == (3 * MiB) // engine.runner.page_bytes
    with pytest.raises(ConfigError, match="memory budget"):
        Engine(base_dir, config=EngineConfig(memory_budget=weights // 2, dtype="float32"))


@pytest.mark.parametrize("fast_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_dtype_auto_is_bf16_where_the_cpu_has_it(small_fleet, monkeypatch, fast_bf16, expected):
    monkeypatch.setattr(lorafleet.models.dtype, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert EngineConfig().dtype == "auto"
    engine = Engine(small_fleet[0], config=EngineConfig(num_pages=256))
    assert engine.runner.dtype == expected


@pytest.mark.skipif(not can_prepack(nn.Linear(2, 2).bfloat16()),
                    reason="this torch build has no oneDNN bf16 linear")
def test_tight_budget_releases_plain_weights_same_tokens(small_fleet):
    base_dir, _, adapters = small_fleet
    prompts = [[5, 9, 13, 2, 7], [3, 3, 8], [11, 4, 6, 1, 9, 2, 2]]
    names = [None, *list(adapters)[:2]]
    plain = load_model(base_dir, dtype=torch.bfloat16)
    weights = weight_bytes(plain)
    results = {}
    for name, config in {
            "unpacked": EngineConfig(num_pages=4096, dtype="bf16", prepack_weights=False),
            "released": EngineConfig(memory_budget=weights + 4096 * 2 * plain.config.hidden_size,
                                     dtype="bf16", max_num_seqs=4)}.items():
        engine = Engine(base_dir, config=config)
        for adapter, path in adapters.items():
            engine.register_adapter(adapter, path)
        results[name] = [r.token_ids for r in engine.generate(
            prompts, adapters=names, params=SamplingParams(max_tokens=6, ignore_eos=True))]
        if name == "released":
            assert engine.memory.release_plain_weights
            packed = {n: m for n, m in engine.model.named_modules()
                      if isinstance(m, PackedLinear)}
            assert packed and all(not m.keep_weight for m in packed.values())
            # the plain weight is gone from the module and comes back bit-exact on demand
            name0, module = next(iter(packed.items()))
            with pytest.raises(AttributeError, match="released after prepacking"):
                module.weight
            original = plain.get_submodule(name0.removesuffix(".base_layer")).weight
            assert torch.equal(module.dense_weight(), original)
            assert torch.equal(module.unpack().weight, original)
    assert results["released"] == results["unpacked"]


def test_serve_flags_reach_the_budget_and_repeat_the_config_defaults():
    from lorafleet.api.state import ServerConfig
    from lorafleet.cli import build_parser
    from lorafleet.cli.serve import memory_budget

    parser = build_parser()

    def parse(*flags):
        return parser.parse_args(["serve", "--model", "m", *flags])

    args = parse()
    assert memory_budget(args) is None and args.num_pages is None and args.dtype == "auto"
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.max_queue) == (
        EngineConfig.max_num_seqs, EngineConfig.max_num_batched_tokens, ServerConfig.max_queue)
    assert memory_budget(parse("--memory-budget", "12GiB")) == 12 * GiB
    assert memory_budget(parse("--memory-budget", "0.7")) == 0.7
    assert memory_budget(parse("--gpu-memory-utilization", "0.8")) == 0.8
    with pytest.raises(ConfigError, match="--memory-budget"):
        memory_budget(parse("--memory-budget", "12 parsecs"))
    with pytest.raises(ConfigError, match="--gpu-memory-utilization"):
        memory_budget(parse("--gpu-memory-utilization", "1.5"))
    with pytest.raises(SystemExit):           # one or the other
        parse("--memory-budget", "1GiB", "--gpu-memory-utilization", "0.5")
