"""The runner's projection shells (`wrap_projections`): every projection of our models, lm_head
included, becomes a `BatchedLoraLinear` under its own name, the same set whether the base is
float or NF4 (models.modules.is_projection recognises the 4-bit layers), and a second call
changes nothing."""
import pytest
import torch

from lorafleet.models import load_model
from lorafleet.quant import quantize_model
from lorafleet.serve.lora_ops import BatchedLoraLinear
from lorafleet.serve.runner import wrap_projections


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_every_projection_gets_one_shell(kind, llama_dir, gpt2_dir):
    path = {"llama": llama_dir, "gpt2": gpt2_dir}[kind]
    model = load_model(path)
    plain = {n: tuple(m.weight.shape) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
    targets = wrap_projections(model)
    assert set(targets) == set(plain) and "lm_head" in targets
    for name, (fan_in, fan_out) in targets.items():
        shell = model.get_submodule(name)
        assert isinstance(shell, BatchedLoraLinear) and shell.name == name
        # nn.Linear stores [out, in], GPT-2's Conv1D [in, out]
        assert plain[name] in ((fan_out, fan_in), (fan_in, fan_out))
    assert wrap_projections(model) == targets
    assert sum(isinstance(m, BatchedLoraLinear) for m in model.modules()) == len(targets)
    assert wrap_projections(quantize_model(load_model(path))) == targets
