"""The optimizer (`--optim`): AdamW, with its state in 8 bits or paged where that pays.

    adamw        torch.optim.AdamW: two float32 moments per trained parameter (8 bytes)
    adamw8bit    bitsandbytes' AdamW8bit: the moments in 8-bit blockwise quantization
                 (2 bytes per parameter + one scale per block), on CPU and CUDA
    paged_adamw  bitsandbytes' PagedAdamW (QLoRA sec. 3): the moments in CUDA unified memory,
                 paged to host memory when the GPU runs short. CUDA only.

For LoRA the state is small (a few MB at r=8), so 8-bit or paged state only matters for full
fine-tuning or very large ranks; docs/train.md has the measurement.
"""
from __future__ import annotations

import torch

from lorafleet.errors import ConfigError

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw")


def check_optimizer(name: str, device: torch.device, parallel: str) -> None:
    """ConfigError, naming the flag, for a choice this device or setup cannot run; the trainer
    calls this before loading anything."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"--optim must be one of {OPTIMIZERS} (found {name!r})")
    if name == "adamw":
        return
    if name == "paged_adamw" and device.type != "cuda":
        raise ConfigError(f"--optim paged_adamw pages optimizer state between GPU and host "
                          f"memory and needs CUDA (device here: {device}); use --optim adamw "
                          "or adamw8bit")
    if parallel == "fsdp":
        # bitsandbytes updates plain tensors; FSDP's parameters are sharded DTensors.
        raise ConfigError(f"--optim {name} does not work with --parallel fsdp; use --optim "
                          "adamw (FSDP already shards its state over the processes)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"--optim {name} needs bitsandbytes (pip install bitsandbytes)") \
            from None


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float,
                   device: torch.device, parallel: str) -> torch.optim.Optimizer:
    """The optimizer `--optim name` over `params` (see check_optimizer for what is refused)."""
    check_optimizer(name, device, parallel)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb
    cls = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.PagedAdamW
    return cls(params, lr=lr, weight_decay=weight_decay)
