"""Data parallelism for `torchrun --nproc_per_node N lorafleet train ...`.

Every process holds the whole model and takes its slice of each global batch; after backward the
trainable parameters' gradients are averaged with one all-reduce per parameter (what DDP does,
minus bucketing and overlap: at adapter sizes the gradients are small). gloo on CPU, NCCL on GPU.
Without torchrun (no WORLD_SIZE) every function here is a no-op for a single process.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as tdist


def setup() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not tdist.is_initialized():
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


def average_gradients(params) -> None:
    if not active():
        return
    for p in params:
        if p.grad is not None:
            tdist.all_reduce(p.grad, op=tdist.ReduceOp.SUM)  # gloo has no ReduceOp.AVG
            p.grad /= world_size()


def sum_scalar(value: torch.Tensor) -> torch.Tensor:
    if active():
        value = value.clone()
        tdist.all_reduce(value, op=tdist.ReduceOp.SUM)
    return value


def cleanup() -> None:
    if active():
        tdist.destroy_process_group()
