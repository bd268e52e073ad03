"""Adapter registration: what the engine refuses to serve, and that it keeps serving after."""
from __future__ import annotations

import pytest
import torch

from lorafleet.errors import AdapterError
from lorafleet.lora.peft_format import read_adapter
from lorafleet.serve.adapter_cache import build_host_adapter
from lorafleet.serve.engine import Engine, EngineConfig, SamplingParams

from .conftest import make_peft_adapter, merged_oracle, oracle_greedy


@pytest.fixture(scope="module")
def lm_head_adapter(small_fleet, tmp_path_factory):
    """A PEFT adapter (made by peft on the oracle) adapting q_proj, v_proj and lm_head."""
    _, base_model, _ = small_fleet
    return make_peft_adapter(base_model, tmp_path_factory.mktemp("lm_head") / "adapter", r=4,
                             targets=["q_proj", "v_proj", "lm_head"], seed=7)


def test_lm_head_lora_is_refused_engine_keeps_serving(small_fleet, lm_head_adapter):
    base_dir, base_model, adapters = small_fleet
    engine = Engine(base_dir, config=EngineConfig(num_pages=1024, block_tokens=4))
    engine.register_adapter("good", adapters["a00"])
    with pytest.raises(AdapterError, match=r"adapter 'with_head'.*'lm_head'.*lm_head is not "
                                           r"served by the engine.*lorafleet merge"):
        engine.register_adapter("with_head", lm_head_adapter)
    assert engine.adapters() == ["good"]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    out = engine.generate([[5, 6, 7], [8, 9]], ["good", None], params)
    assert out[0].token_ids == oracle_greedy(merged_oracle(base_model, adapters["a00"]),
                                             [5, 6, 7], 4)
    assert out[1].token_ids == oracle_greedy(base_model, [8, 9], 4)


def test_exclude_is_what_refuses_it(small_fleet, lm_head_adapter):
    """With only the LoRA tensors (peft also saves `lm_head.base_layer.weight`), the adapter lays
    out when lm_head is not excluded (its shapes fit), so the refusal comes from `exclude`, not
    from a shape or name mismatch."""
    base_dir, _, _ = small_fleet
    engine = Engine(base_dir, config=EngineConfig(num_pages=64, block_tokens=4))
    config, tensors = read_adapter(lm_head_adapter)
    assert "base_model.model.lm_head.base_layer.weight" in tensors
    lora_only = {key: t for key, t in tensors.items() if ".lora_" in key}
    args = (config, lora_only, engine.runner.targets, 64, 8, torch.float32)
    host = build_host_adapter("with_head", *args)
    assert "lm_head" in host.modules and host.modules["lm_head"].rank == 4
    with pytest.raises(AdapterError, match="module 'lm_head': LoRA on lm_head is not served"):
        build_host_adapter("with_head", *args, exclude=frozenset({"lm_head"}))


def test_qlora_adapters_served_on_a_4bit_base(small_fleet):
    """`serve --quantize nf4`: the engine adapts the NF4 base's Linear4bit projections (they
    are projections like nn.Linear) and each request equals lorafleet's own QLoRA model (the
    4-bit base with the adapter loaded, tested against peft + bitsandbytes in tests/quant)."""
    from lorafleet.lora.peft_model import load_adapter
    from lorafleet.models.generate import SamplingParams, generate
    from lorafleet.quant import load_quantized_model

    base_dir, _, adapters = small_fleet
    names = ["a00", "a02", "a03"]                         # q,v / MLP / all seven projections
    prompts = [[5, 9, 13, 2, 7], [3, 3, 8, 1], [11, 4, 6]]
    engine = Engine(load_quantized_model(base_dir), config=EngineConfig(num_pages=2048))
    for name in names:
        engine.register_adapter(name, adapters[name])
    served = engine.generate(prompts + prompts[:1], adapters=names + [None],
                             params=SamplingParams(max_tokens=5, ignore_eos=True))
    greedy = SamplingParams(max_tokens=5, ignore_eos=True)
    for name, prompt, out in zip(names, prompts, served):
        model = load_adapter(load_quantized_model(base_dir), adapters[name])
        assert out.token_ids == generate(model, prompt, sampling=greedy).token_ids, name
    assert served[3].token_ids == generate(load_quantized_model(base_dir), prompts[0],
                                           sampling=greedy).token_ids
