"""The base model a training run starts from, in the precision its method trains over.

    qlora   streamed from the checkpoint straight into NF4 (`quant.load_quantized_model`): the
            16/32-bit base never exists in memory (QLoRA's point); embeddings, norms and lm_head
            in the compute dtype (auto: bf16 where the device computes it)
    lora    the frozen base in --dtype (auto: the checkpoint's dtype where the device computes
            it well, else float32)
    others  float32 (a bottleneck adapter or a virtual-token tensor meeting a bf16 activation
            would need casts everywhere; --bf16 autocasts their matmuls instead)

Whatever the base, the trained weights are float32.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from lorafleet.errors import ConfigError
from lorafleet.models.dtype import AUTO, device_computes, parse_dtype, resolve_dtype
from lorafleet.train.config import TrainConfig
from lorafleet.train.methods import OUTPUT_HEADS

logger = logging.getLogger(__name__)

HALF_BASE_METHODS = ("lora", "qlora")


def load_base(cfg: TrainConfig, device: torch.device, progress=None) -> nn.Module:
    """The base model for `cfg.method` on `device`, in the precision the module docstring
    gives; ConfigError naming --dtype for a dtype the method or device cannot train over.
    `progress(done, total)`: called per checkpoint tensor read (models.loader)."""
    from lorafleet.models import load_model
    method = cfg.method.method
    requested = parse_dtype(cfg.dtype, "dtype")
    if method not in HALF_BASE_METHODS:
        if requested not in (AUTO, torch.float32):
            raise ConfigError(f"--dtype {cfg.dtype}: only lora and qlora train over a 16-bit "
                              f"base; --method {method} trains in float32 (use --bf16 for "
                              "bf16 autocast)")
        return load_model(cfg.model, dtype=torch.float32, device=device, progress=progress)
    # qlora: auto computes in bf16 wherever the device does (QLoRA's compute dtype), whatever
    # the checkpoint declares; lora: the checkpoint's dtype (reduced precision is a choice).
    dtype = resolve_dtype(requested, cfg.model, device, prefer_half=method == "qlora",
                          field="--dtype")
    if not device_computes(dtype, device):
        name = str(dtype).removeprefix("torch.")
        # bf16 on a CPU without bf16 instructions runs (emulated, slowly); fp16 on CPU and a
        # GPU without bf16 support are refused before any work.
        if not (device.type == "cpu" and dtype == torch.bfloat16):
            raise ConfigError(f"--dtype {cfg.dtype}: {device} does not compute {name} "
                              "matmuls; use --dtype auto or float32")
        logger.warning("--dtype %s: this CPU has no bf16 instructions; bf16 matmuls are "
                       "emulated and slower than float32", cfg.dtype)
    if method == "qlora":
        from lorafleet.quant import load_quantized_model
        return load_quantized_model(cfg.model, dtype=dtype, device=device, skip=OUTPUT_HEADS,
                                    progress=progress)
    return load_model(cfg.model, dtype=dtype, device=device, progress=progress)


def trainable_in_float32(model: nn.Module) -> None:
    """Trained weights in float32 over any base dtype (as PEFT and QLoRA do): AdamW's small
    updates would round away in bf16."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
