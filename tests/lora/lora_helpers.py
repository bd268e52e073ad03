"""Oracles for LoRA tests: a fresh transformers model, and a PEFT model with non-zero B."""
from __future__ import annotations

import logging
import warnings

import torch

logging.getLogger("peft").setLevel(logging.ERROR)


def hf_model(path):
    """A fresh fp32 transformers model from a checkpoint folder (eval mode)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def ids_for(batch: int = 3, length: int = 7, vocab: int = 384, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=g)


def peft_random(path, adapter_name: str = "default", seed: int = 0, **config):
    """A PEFT model on a fresh base with random (non-zero) A and B, so comparisons mean
    something (PEFT's default B=0 would make every adapter equal to the base)."""
    import peft

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(hf_model(path), peft.LoraConfig(init_lora_weights=False, **config),
                                    adapter_name=adapter_name)
    return model.eval()


def logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits
