"""LoftQ (quant/loftq.py) on our NF4. PEFT's own loftq_init needs bitsandbytes on CUDA (it moves
the weight to "cuda"), so it cannot run here; the oracles are PEFT's `_low_rank_decomposition`
(the same SVD factors), our NF4 quantizer, and LoftQ's defining property: the NF4 base plus B A
is closer to the float weight than NF4 alone, and closer with more alternations."""
import copy

import pytest
import torch

import lorafleet as lf

from lorafleet.errors import ConfigError
from lorafleet.lora import LoraConfig, inject_lora, unload
from lorafleet.quant import Linear4bit, dequantize_nf4, quantize_model, quantize_nf4
from lorafleet.quant.loftq import loftq_model, loftq_weights

from .lora_helpers import hf_model, logits


def test_loftq_factors_are_peft_low_rank_of_the_quantization_error():
    from peft.utils.loftq_utils import _low_rank_decomposition

    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    nf4, A, B = loftq_weights(weight, rank=8, num_iter=1)
    error = weight - dequantize_nf4(quantize_nf4(weight), torch.float32)
    expected = _low_rank_decomposition(error, reduced_rank=8)
    torch.testing.assert_close(A, expected["R"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(B, expected["L"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dequantize_nf4(nf4, torch.float32),
                               dequantize_nf4(quantize_nf4(weight), torch.float32))

    def loss(num_iter):
        q, a, b = loftq_weights(weight, rank=8, num_iter=num_iter)
        return torch.linalg.norm(weight - dequantize_nf4(q, torch.float32) - b @ a).item()

    plain = torch.linalg.norm(error).item()
    assert loss(1) < 0.97 * plain and loss(5) <= loss(1) * 1.001
    with pytest.raises(ConfigError, match="num_iter"):
        loftq_weights(weight, rank=2, num_iter=0)


def test_loftq_model_starts_closer_to_the_float_model_than_qlora(llama_dir, tmp_path, ids):
    config = LoraConfig(r=8, lora_alpha=8, target_modules="all-linear")
    reference = logits(hf_model(llama_dir), ids)
    loftq = loftq_model(hf_model(llama_dir), config, num_iter=2)
    qlora = inject_lora(quantize_model(hf_model(llama_dir)), config)
    adapted = [m for m in loftq.modules() if hasattr(m, "lora_A")]
    assert adapted and all(isinstance(m.base_layer, Linear4bit) for m in adapted)
    gap_loftq = (logits(loftq, ids) - reference).abs().mean()
    gap_qlora = (logits(qlora, ids) - reference).abs().mean()
    assert gap_loftq < 0.8 * gap_qlora, (gap_loftq, gap_qlora)
    assert loftq.lora_configs["default"].init_lora_weights == "loftq"
    # it saves and loads as a PEFT folder over the same NF4 base (no re-initialization on load)
    lf.save_adapter(loftq, tmp_path / "a")
    nf4_base = unload(copy.deepcopy(loftq))      # the NF4 base without the adapter
    reloaded = lf.load_adapter(nf4_base, tmp_path / "a")
    torch.testing.assert_close(logits(reloaded, ids), logits(loftq, ids), atol=1e-5, rtol=0)
