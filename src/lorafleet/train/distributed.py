"""Several processes: `torchrun --nproc_per_node N -m lorafleet.cli train ...`.

Two ways to spread a run over processes, both torch's own:

- **DDP** (DistributedDataParallel): every process holds the whole model and takes its slice of
  each global batch; gradients are averaged in buckets while backward still runs (overlap), and
  `no_sync` skips that for all but the last micro-batch of a step (gradient accumulation).
- **FSDP2** (`fully_shard`): parameters, gradients and optimizer state are sharded over the
  processes, each decoder layer gathered only while it runs. For full fine-tuning and for LoRA
  over a base too large for one process (the frozen base is sharded; the adapters train). A 4-bit
  base's packed NF4 storage is buffers, which FSDP replicates rather than shards.

gloo on CPU, NCCL on GPU. Without torchrun (no WORLD_SIZE) the process-group functions are
no-ops for a single process and `wrap` returns the model unchanged.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as tdist
from torch import nn

from lorafleet.errors import ConfigError

DECODER_LAYER_LISTS = ("layers", "h")  # Llama family, GPT-2: the ModuleList of decoder blocks


def launched() -> bool:
    """True when started by torchrun (or another launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup() -> None:
    if launched() and not tdist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        tdist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    return tdist.get_world_size() if active() else 1


def rank() -> int:
    return tdist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    if active():
        tdist.barrier()


def sum_scalar(value: torch.Tensor) -> torch.Tensor:
    if active():
        value = value.clone()
        tdist.all_reduce(value, op=tdist.ReduceOp.SUM)
    return value


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any: a stop request (SIGTERM, a callback) must
    stop every process at the same step, or the next collective would hang."""
    if not active():
        return flag
    value = torch.tensor([int(flag)], device=_collective_device())
    tdist.all_reduce(value, op=tdist.ReduceOp.MAX)
    return bool(value.item())


def _collective_device() -> torch.device:
    return default_device() if tdist.get_backend() == "nccl" else torch.device("cpu")


def resolve_mode(requested: str) -> str:
    """--parallel auto|none|ddp|fsdp -> none | ddp | fsdp for this launch."""
    if requested in ("ddp", "fsdp") and not launched():
        raise ConfigError(f"--parallel {requested} needs several processes: start the run with "
                          "torchrun --nproc_per_node N -m lorafleet.cli train ...")
    if requested == "auto":
        return "ddp" if launched() else "none"
    if requested == "none" and launched():
        raise ConfigError("--parallel none under torchrun: every process would train alone; "
                          "use --parallel ddp or fsdp")
    return requested


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    return [layer for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList)
            and name.rpartition(".")[2] in DECODER_LAYER_LISTS for layer in module]


def wrap(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """The module the loop calls: `model` itself (none, fsdp: sharded in place) or a DDP
    wrapper. Parameters stay reachable through `model` in every case."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        # Every rank built the same model from the same seed, but DDP also broadcasts rank 0's
        # parameters and buffers at construction, so the replicas start identical regardless.
        # gradient_as_bucket_view: .grad tensors are views into the all-reduce buckets rather
        # than a second copy of every gradient (for full fine-tuning, the model's size again).
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                       else None, gradient_as_bucket_view=True)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        layers = decoder_layers(model)
        if not layers:
            raise ConfigError("--parallel fsdp: no decoder layer list (*.layers / *.h) to shard")
        for layer in layers:  # one all-gather per layer, freed after its forward/backward
            fully_shard(layer)
        fully_shard(model)
        return model
    return model


def no_sync(engine: nn.Module, last_micro_batch: bool):
    """Skip the gradient all-reduce / reduce-scatter for all but a step's last micro-batch."""
    if last_micro_batch:
        return contextlib.nullcontext()
    if hasattr(engine, "no_sync"):             # DDP
        return engine.no_sync()
    if hasattr(engine, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(engine)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(engine):
    engine.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        engine.set_requires_gradient_sync(True)


def full_norm(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a float (a DTensor under FSDP)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


@contextlib.contextmanager
def gathered_trainable(model: nn.Module, mode: str):
    """Inside, on the main process, every trained parameter of an FSDP-sharded `model` is a
    whole plain tensor, so the usual writers (PEFT folder, trainable.safetensors) work; the
    frozen base stays sharded (gathering it would put a large base whole on every process).
    Each parameter is all-gathered in turn; the other processes drop their copy at once."""
    if mode != "fsdp":
        yield model
        return
    swapped = []
    for module in model.modules():  # the same order on every process: collectives match
        for name, param in list(module._parameters.items()):
            if param is None or not param.requires_grad or not hasattr(param, "full_tensor"):
                continue
            whole = param.full_tensor()
            if is_main():
                module._parameters[name] = nn.Parameter(whole.detach(), requires_grad=True)
                swapped.append((module, name, param))
    try:
        yield model
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def cleanup() -> None:
    if active():
        tdist.destroy_process_group()
