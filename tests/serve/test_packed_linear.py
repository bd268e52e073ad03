"""Prepacked bf16 projections (packed_linear.py): bit-identical to nn.Linear, repacked after an
in-place change of the weight, and an engine serving with them gives the same tokens."""
import pytest
import torch
from torch import nn

from lorafleet.serve import Engine, EngineConfig, SamplingParams
from lorafleet.serve.packed_linear import PackedLinear, can_prepack

pytestmark = pytest.mark.skipif(not can_prepack(nn.Linear(2, 2).bfloat16()),
                                reason="this torch build has no oneDNN bf16 linear")


@pytest.mark.parametrize("bias", [False, True])
def test_bit_identical_to_linear_and_repacks_after_merge(bias):
    torch.manual_seed(0)
    linear = nn.Linear(200, 300, bias=bias).bfloat16().requires_grad_(False)
    packed = PackedLinear(linear)
    for shape in [(1, 200), (17, 200), (2, 9, 200)]:
        x = torch.randn(shape).bfloat16()
        assert torch.equal(packed(x), linear(x))
    x = torch.randn(5, 200).bfloat16()
    with torch.inference_mode():
        linear.weight.add_(0.5)              # e.g. merge-and-swap merging an adapter in place
    assert torch.equal(packed(x), linear(x))
    assert packed.weight is linear.weight     # shared, not copied


def test_not_for_other_dtypes_or_subclasses():
    assert not can_prepack(nn.Linear(4, 4))                       # float32
    assert not can_prepack(nn.Linear(4, 4).half())

    class Custom(nn.Linear):
        pass
    assert not can_prepack(Custom(4, 4).bfloat16())


def test_engine_tokens_equal_with_and_without_prepacking(small_fleet):
    base_dir, _, adapters = small_fleet
    prompts = [[5, 9, 13, 2, 7], [3, 3, 8], [11, 4, 6, 1, 9, 2, 2], [8, 8, 1, 4]]
    names = [None, *list(adapters)[:3]]
    outputs = []
    for prepack in (True, False):
        engine = Engine(base_dir, config=EngineConfig(num_pages=4096, dtype=torch.bfloat16,
                                                      prepack_weights=prepack))
        packed = sum(isinstance(m, PackedLinear) for m in engine.model.modules())
        assert (packed > 0) == prepack
        for name, path in adapters.items():
            engine.register_adapter(name, path)
        results = engine.generate(prompts, adapters=names,
                                  params=SamplingParams(max_tokens=6, ignore_eos=True))
        outputs.append([r.token_ids for r in results])
    assert outputs[0] == outputs[1]
