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
