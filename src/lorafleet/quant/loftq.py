"""LoftQ (Li et al., arXiv 2310.08659): an NF4 base plus a LoRA init that absorbs its
quantization error, PEFT's `init_lora_weights="loftq"` (peft.utils.loftq_utils.loftq_init):

    res = W
    repeat num_iter times:
        Q = NF4(res);  L R = rank-r SVD of (W - deq(Q))   (L = U sqrt(S), R = sqrt(S) Vh)
        res = W - L R                                       (not after the last one)
    base <- Q,  B <- L,  A <- R

so deq(Q) + B A approximates W better than deq(NF4(W)) alone. As in PEFT, A and B are not
divided by the LoRA scaling: the fold is exact in intent when lora_alpha = r (scaling 1), and a
warning says so otherwise. Lives in quant (it needs NF4, right of lora in the pipeline).
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from lorafleet.errors import ConfigError
from lorafleet.lora.config import LoraConfig
from lorafleet.lora.inject import inject_lora
from lorafleet.lora.layers import LoraLinear
from lorafleet.models.modules import OUTPUT_HEAD, is_conv1d, name_matches

from .linear4bit import Linear4bit
from .model import quantize_model
from .nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

log = logging.getLogger(__name__)


def low_rank(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L [out, r], R [r, in]) with L R the best rank-r approximation (PEFT's
    `_low_rank_decomposition`)."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(torch.diag(S))
    return U @ root[:, :rank], root[:rank, :] @ Vh


@torch.no_grad()
def loftq_weights(weight: torch.Tensor, rank: int, num_iter: int = 1, block_size: int = 64,
                  double_quant: bool = True
                  ) -> tuple[NF4Tensor, torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (its NF4 base Q, A [r, in], B [out, r]) by LoftQ's alternation."""
    if not isinstance(num_iter, int) or num_iter <= 0:
        raise ConfigError(f"loftq num_iter: expected a positive integer, found {num_iter!r}")
    weight = weight.float()
    res = weight.clone()
    for i in range(num_iter):
        nf4 = quantize_nf4(res, block_size, double_quant)
        L, R = low_rank(weight - dequantize_nf4(nf4, torch.float32), rank)
        if i + 1 == num_iter:
            break
        res = weight - L @ R
    return nf4, R, L


@torch.no_grad()
def loftq_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                num_iter: int = 1, block_size: int = 64, double_quant: bool = True,
                skip: tuple[str, ...] = (OUTPUT_HEAD,)) -> nn.Module:
    """Inject adapter `adapter_name` into the float `model` with LoftQ's init: each adapted
    layer's base becomes NF4 (`Linear4bit`) with A, B absorbing its quantization error; the other
    linear layers are quantized as QLoRA does (except `skip`). The saved config says
    init_lora_weights="loftq", as PEFT's does."""
    if any(isinstance(m, Linear4bit) for m in model.modules()):
        raise ConfigError("loftq: the model is already 4-bit; LoftQ starts from the float weights")
    inject_lora(model, dataclasses.replace(config, init_lora_weights=True), adapter_name)
    layers = [m for m in model.modules() if isinstance(m, LoraLinear) and adapter_name in m.r]
    for layer in layers:
        if layer.scaling[adapter_name] != 1:
            log.warning("loftq: scaling %.4g != 1 (lora_alpha != r): B A is scaled in forward, "
                        "so it does not fold the quantization error exactly (PEFT does the same)",
                        layer.scaling[adapter_name])
            break
    for layer in layers:
        base = layer.base_layer
        nf4, A, B = loftq_weights(layer.base_weight(), layer.r[adapter_name], num_iter,
                                  block_size, double_quant)
        bias = getattr(base, "bias", None)
        new = Linear4bit(layer.in_features, layer.out_features, bias=bias is not None,
                         block_size=block_size, double_quant=double_quant,
                         device=A.device, dtype=layer.lora_A[adapter_name].weight.dtype)
        new.set_nf4(nf4)
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        layer.base_layer, layer.fan_in_fan_out = new, False   # Linear4bit stores [out, in]
        dtype = layer.lora_A[adapter_name].weight.dtype
        layer.lora_A[adapter_name].weight.data = A.to(dtype)
        layer.lora_B[adapter_name].weight.data = B.to(dtype)
        layer.initial_lora[adapter_name] = (A.to(dtype).clone(), B.to(dtype).clone())
    rest = [n for n, m in model.named_modules() if (isinstance(m, nn.Linear) or is_conv1d(m))
            and ".lora_" not in n and not name_matches(n, skip)]
    if rest:   # the projections LoRA does not adapt: NF4 as QLoRA has them (quantize_model's rule)
        quantize_model(model, skip=skip, block_size=block_size, double_quant=double_quant)
    model.lora_configs[adapter_name] = dataclasses.replace(config, init_lora_weights="loftq")
    return model
