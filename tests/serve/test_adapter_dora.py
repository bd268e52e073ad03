"""DoRA adapters served by the engine (issue 20): mixed batches of DoRA adapters, plain LoRA
adapters and base-model requests; every request's greedy tokens equal transformers + peft with
its adapter alone. The batched kernel adds s B A x for DoRA rows like any LoRA's, then
BatchedLoraLinear rescales those rows by g = m / ||W0 + s B A||_row (lora_ops.py)."""
from __future__ import annotations

import copy
import random

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lorafleet.lora.peft_format import load_peft
from lorafleet.serve.engine import Engine, EngineConfig, SamplingParams

from .conftest import oracle_greedy

MAX_TOKENS = 5


def _peft_dora(base_model, path, r, targets, seed, **config):
    """A PEFT DoRA adapter with random A, B and a magnitude away from ||W0 + s B A|| (at that
    value DoRA equals plain LoRA)."""
    model = get_peft_model(copy.deepcopy(base_model), LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=targets, use_dora=True, **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(0.6 + 0.8 * torch.rand(param.shape, generator=gen))
            elif "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("fleet", ["small_fleet", "gpt2_fleet"])
def test_dora_in_mixed_batches_equals_peft_per_request(fleet, request, tmp_path):
    base_dir, base_model, adapters = request.getfixturevalue(fleet)
    gpt2 = fleet == "gpt2_fleet"
    dora = {
        "dora1": _peft_dora(base_model, tmp_path / "d1", 4,
                            ["c_attn", "c_proj"] if gpt2 else ["q_proj", "v_proj", "down_proj"],
                            seed=1, **({"fan_in_fan_out": True} if gpt2 else {})),
        "dora2": _peft_dora(base_model, tmp_path / "d2", 2,
                            ["c_fc"] if gpt2 else ["q_proj", "k_proj", "o_proj", "up_proj"],
                            seed=2, use_rslora=True, **({"fan_in_fan_out": True} if gpt2 else {})),
    }
    plain = dict(list(sorted(adapters.items()))[:2])
    engine = Engine(base_dir, config=EngineConfig(num_pages=1500, block_tokens=4,
                                                  max_num_seqs=6, dtype="float32"))
    for name, path in {**dora, **plain}.items():
        engine.register_adapter(name, path, lazy=name == "dora2")
    # and from tensors in memory (its page copy built by adapter_pages, not the loader)
    raw = load_peft(dora["dora1"])
    engine.register_adapter_tensors("dora1_mem", raw.config, raw.tensors)
    dora["dora1_mem"] = dora["dora1"]
    rng = random.Random(5)
    names = list(dora) + list(plain) + [None]
    workload = [(f"r{i}", [rng.randrange(4, 300) for _ in range(rng.randint(2, 7))],
                 names[i % len(names)]) for i in range(12)]
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    for request_id, prompt, name in workload:
        engine.add_request(request_id, prompt, name, params)
    results, mixed = {}, False
    while engine.has_work():
        outs = engine.step()
        mixed |= len({o.request_id for o in outs}) > 2
        for out in outs:
            assert out.error is None, out.error
            results[out.request_id] = results.get(out.request_id, []) + out.new_token_ids
    assert mixed
    oracles = {}
    for request_id, prompt, name in workload:
        if name not in oracles:
            path = {**dora, **plain}.get(name)
            oracles[name] = (copy.deepcopy(base_model) if path is None else
                             PeftModel.from_pretrained(copy.deepcopy(base_model), path)).eval()
        assert results[request_id] == oracle_greedy(oracles[name], prompt, MAX_TOKENS), \
            (request_id, name)
    # the DoRA rescale changed the outputs (with m = ||W0 + s B A||, DoRA would equal LoRA)
    with torch.no_grad():
        ids = torch.tensor([workload[0][1]])
        with oracles["dora1"].disable_adapter():
            base_logits = oracles["dora1"](ids).logits
        assert not torch.allclose(oracles["dora1"](ids).logits, base_logits, atol=1e-3)
    engine.close()


def test_dora_over_an_nf4_base_equals_lorafleets_qlora_model(small_fleet, tmp_path):
    """`serve --quantize nf4`: DoRA's norm over the dequantized NF4 weight; each request equals
    lorafleet's own 4-bit model with the adapter loaded (tests/lora/test_dora.py: equal to DoRA
    over the dequantized weight)."""
    from lorafleet.lora.peft_model import load_adapter
    from lorafleet.models.generate import SamplingParams as Greedy
    from lorafleet.models.generate import generate
    from lorafleet.quant import load_quantized_model

    base_dir, base_model, adapters = small_fleet
    path = _peft_dora(base_model, tmp_path / "d", 4, ["q_proj", "v_proj", "up_proj"], seed=3)
    engine = Engine(load_quantized_model(base_dir), config=EngineConfig(num_pages=2048))
    engine.register_adapter("d", path)
    engine.register_adapter("a00", adapters["a00"])
    prompts = [[5, 9, 13, 2, 7], [3, 3, 8, 1], [11, 4, 6]]
    served = engine.generate(prompts, adapters=["d", "a00", "d"],
                             params=SamplingParams(max_tokens=5, ignore_eos=True))
    greedy = Greedy(max_tokens=5, ignore_eos=True)
    for prompt, name, out in zip(prompts, ["d", "a00", "d"], served):
        model = load_adapter(load_quantized_model(base_dir), path if name == "d" else adapters[name])
        assert out.token_ids == generate(model, prompt, sampling=greedy).token_ids, name
    engine.close()
