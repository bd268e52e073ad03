"""Oracles shared by the quant tests."""
import torch
from torch import nn


def bnb_nf4_transformers(path, double_quant):
    """The oracle: transformers' model with every decoder linear replaced by bitsandbytes'
    NF4 round trip of its weight (lm_head kept, as our default)."""
    import bitsandbytes.functional as bnbF
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                packed, state = bnbF.quantize_4bit(module.weight, blocksize=64, quant_type="nf4",
                                                   compress_statistics=double_quant)
                module.weight.copy_(bnbF.dequantize_4bit(packed, state))
    return model
