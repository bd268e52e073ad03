"""Serving fixtures: random base checkpoints and many PEFT adapters of mixed ranks and target
sets, made with peft on the transformers oracle model (B random and non-zero, so every adapter
changes the output), plus the oracle's greedy completion per (adapter, prompt)."""
from __future__ import annotations

import copy
import random

import pytest
import torch

from hf_fixtures import make_checkpoint

LLAMA_TARGETS = [
    ["q_proj", "v_proj"],
    ["q_proj", "k_proj", "v_proj", "o_proj"],
    ["gate_proj", "up_proj", "down_proj"],
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
]
GPT2_TARGETS = [["c_attn"], ["c_attn", "c_proj"], ["c_fc"], ["c_attn", "c_proj", "c_fc"]]
RANKS = [1, 2, 4, 8, 16]
NUM_ADAPTERS = 22


def make_peft_adapter(base_model, path, r, targets, seed, alpha=None, use_rslora=False,
                      rank_pattern=None, fan_in_fan_out=False):
    """Save a PEFT adapter with random A and B for `base_model` (the transformers oracle)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=targets,
                        use_rslora=use_rslora, rank_pattern=rank_pattern or {},
                        fan_in_fan_out=fan_in_fan_out, lora_dropout=0.0)
    model = get_peft_model(copy.deepcopy(base_model), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:   # test-side only: give B (zero at init) random values
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    model.save_pretrained(path, safe_serialization=True)
    return path


def merged_oracle(base_model, adapter_path):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base_model), adapter_path).merge_and_unload()


def oracle_greedy(model, prompt, max_new_tokens):
    """transformers greedy decoding, ignoring EOS, new tokens only."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def _build(tmp_path_factory, kind, targets_list, num_adapters=NUM_ADAPTERS):
    root = tmp_path_factory.mktemp(f"serve_{kind}")
    base = make_checkpoint(root / "base", kind, seed=1)
    rng = random.Random(0)
    adapters = {}
    for i in range(num_adapters):
        r = RANKS[i % len(RANKS)]
        targets = targets_list[i % len(targets_list)]
        kwargs = {}
        if i % 7 == 3:
            kwargs["use_rslora"] = True
        if i % 5 == 4 and kind == "llama":
            kwargs["rank_pattern"] = {"v_proj": max(1, r // 2)} if "v_proj" in targets else {}
        if kind == "gpt2":
            kwargs["fan_in_fan_out"] = True
        name = f"a{i:02d}"
        adapters[name] = make_peft_adapter(base, root / name, r, targets, seed=100 + i,
                                           alpha=rng.choice([None, 4, 16]), **kwargs)
    return root / "base", base, adapters


@pytest.fixture(scope="session")
def llama_fleet(tmp_path_factory):
    """(checkpoint dir, transformers oracle, {adapter name: PEFT folder})."""
    return _build(tmp_path_factory, "llama", LLAMA_TARGETS)


@pytest.fixture(scope="session")
def gpt2_fleet(tmp_path_factory):
    return _build(tmp_path_factory, "gpt2", GPT2_TARGETS)


@pytest.fixture(scope="session")
def small_fleet(tmp_path_factory):
    """A Llama with four adapters (ranks 1, 2, 4, 8): for the quick tests."""
    return _build(tmp_path_factory, "llama", LLAMA_TARGETS, num_adapters=4)


def random_store(fleet, root, names: list[str], seed: int):
    """A PEFT folder under `root` per name: the fleet's adapter configs in turn (for the small
    fleet: ranks 1-8, four target sets, rsLoRA, rank_pattern), each with random weights of its
    own (generator seeded seed + i)."""
    from lorafleet.lora.peft_format import load_peft, write_adapter

    _, _, adapters = fleet
    templates = [load_peft(adapters[name]) for name in sorted(adapters)]
    for i, name in enumerate(names):
        template = templates[i % len(templates)]
        gen = torch.Generator().manual_seed(seed + i)
        write_adapter(root / name, template.config,
                      {k: torch.randn(t.shape, generator=gen) * 0.3
                       for k, t in template.tensors.items()})
    return root


# ---- the pool returns to all-free after every test (issue 6) --------------------------------
# Every PagePool and Engine made during the session is tracked (module-scoped engines too, which
# are built before a test's own fixtures run); after each test the ones it made (held strongly
# until then: a test's local engine is gone when it returns) and every older live one are checked.

_NEW: list = []            # made since the last check
_POOLS: "weakref.WeakSet" = None
_ENGINES: "weakref.WeakSet" = None


@pytest.fixture(scope="session", autouse=True)
def _track_pools_and_engines():
    global _POOLS, _ENGINES
    import weakref

    from lorafleet.serve import engine as engine_module
    from lorafleet.serve import pool as pool_module

    _POOLS, _ENGINES = weakref.WeakSet(), weakref.WeakSet()
    pool_init, engine_init = pool_module.PagePool.__init__, engine_module.Engine.__init__

    def tracked_pool_init(self, *args, **kwargs):
        pool_init(self, *args, **kwargs)
        _NEW.append(self)

    def tracked_engine_init(self, *args, **kwargs):
        engine_init(self, *args, **kwargs)
        _NEW.append(self)

    pool_module.PagePool.__init__ = tracked_pool_init
    engine_module.Engine.__init__ = tracked_engine_init
    yield
    pool_module.PagePool.__init__, engine_module.Engine.__init__ = pool_init, engine_init


def assert_engine_drains_to_all_free(engine) -> None:
    """No request left, accounting holds, and once unreferenced adapters are evicted every page
    of the pool is free (nothing leaked: KV of finished/aborted requests, adapter pages)."""
    assert not engine.has_work(), f"test left requests in the engine: {list(engine.requests)}"
    pool = engine.pool
    pool.check()
    assert pool.used_by["kv"] == 0, pool.stats()
    assert not engine.cache.refcount, f"adapters still referenced: {engine.cache.refcount}"
    engine.cache.reclaim(pool.num_pages)
    pool.check()
    assert not engine.cache.resident and pool.num_free == pool.num_pages, pool.stats()


@pytest.fixture(autouse=True)
def _pool_all_free_after_test():
    from lorafleet.serve.engine import Engine

    yield
    for obj in _NEW:
        (_ENGINES if isinstance(obj, Engine) else _POOLS).add(obj)
    _NEW.clear()
    for pool in list(_POOLS):
        pool.check()
    for engine in list(_ENGINES):
        assert_engine_drains_to_all_free(engine)
