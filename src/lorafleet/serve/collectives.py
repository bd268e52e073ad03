"""The collectives of tensor-parallel serving (parallel.py, shard.py): one process group per
engine, gloo on CPU and NCCL on CUDA, and the two operations the sharded forward calls.

    all_reduce(t)   row-parallel outputs (o_proj, down_proj) and, vocab-sharded, the embedding
    gather(t)       vocab-sharded lm_head: every rank's logits slice to rank 0, which samples

Placement: on CPU every rank is a process on this machine (gloo over loopback); on CUDA rank r
runs on `cuda:r`, one GPU per rank (NCCL). Only these tensors go through the group: token ids,
page tables and adapter pages go from rank 0 to the workers through pipes as pickled CPU data
(parallel.py), so NCCL never sees metadata and no gloo side group is needed.

No global process group (`init_process_group`): each engine builds its own `ProcessGroupGloo`
or `ProcessGroupNCCL` on its own TCPStore, so several engines can live in one process.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from lorafleet.errors import ConfigError

STARTUP_TIMEOUT_S = 300.0     # workers: spawn, import, load and shard the model


@dataclass
class CommStats:
    """Collectives on rank 0: count, bytes of the tensor each carries (an all-reduce moves
    2 (N-1)/N of it per rank in a ring; a gather moves (N-1)/N of the gathered tensor into rank
    0), and seconds spent in them (blocking waits on CUDA too, see `new_group`)."""
    calls: int = 0
    tensor_bytes: int = 0
    seconds: float = 0.0
    gather_calls: int = 0
    gather_bytes: int = 0         # the gathered tensor (all ranks' slices together)
    gather_seconds: float = 0.0
    steps: int = 0
    control_bytes: int = 0        # pickled step messages, per worker (pipes)
    page_bytes: int = 0           # adapter pages sent to workers, per worker

    def as_dict(self) -> dict:
        return {"allreduce_calls": self.calls, "allreduce_tensor_bytes": self.tensor_bytes,
                "allreduce_seconds": self.seconds, "gather_calls": self.gather_calls,
                "gather_tensor_bytes": self.gather_bytes,
                "gather_seconds": self.gather_seconds, "tp_steps": self.steps,
                "tp_control_bytes": self.control_bytes, "tp_page_bytes": self.page_bytes}


def rank_device(device: str, rank: int) -> str:
    """Where rank `rank` computes: the CPU for all, or `cuda:rank` (one GPU per rank)."""
    return "cpu" if device == "cpu" else f"cuda:{rank}"


def check_devices(world: int, device: str) -> None:
    """ConfigError before anything loads or starts: a device other than the CPU or the first
    GPU for rank 0, fewer GPUs than ranks, more ranks than CPU cores."""
    if device == "cpu":
        cores = os.cpu_count() or 1
        if world > cores:
            raise ConfigError(f"tensor_parallel_size {world} is more than this machine's "
                              f"{cores} CPU cores")
        return
    if device not in ("cuda", "cuda:0"):
        raise ConfigError(f"tensor_parallel_size {world} on device {device!r}: use 'cpu' or "
                          f"'cuda' (rank r runs on cuda:r, so rank 0, this process, on cuda:0)")
    if not torch.cuda.is_available():
        raise ConfigError(f"tensor_parallel_size {world} on device {device!r}: CUDA is not "
                          f"available to this torch build or machine")
    count = torch.cuda.device_count()
    if count < world:
        raise ConfigError(f"tensor_parallel_size {world} needs one GPU per rank (rank r on "
                          f"cuda:r); {count} visible (CUDA_VISIBLE_DEVICES)")
    if not dist.is_nccl_available():
        raise ConfigError(f"tensor_parallel_size {world} on CUDA needs NCCL; this torch build "
                          f"has none")


def new_group(store, rank: int, world: int, device: str, timeout_s: float):
    """This rank's process group. gloo: joining waits up to STARTUP_TIMEOUT_S for every rank
    (workers spawn and import torch first); each collective has its own timeout (`Collectives`).
    NCCL: the communicator is made at the first collective (parallel.py runs one once every
    worker reported ready); the group's timeout is timeout_s for every collective, and
    TORCH_NCCL_BLOCKING_WAIT (unless set otherwise) makes `wait()` block the CPU until the
    collective ends or times out, raising: a dead or stuck rank becomes an error on rank 0
    rather than a hang or NCCL's watchdog tearing the server process down. It costs the
    overlap of the next kernel launches with the collective (one host sync per collective)."""
    if device == "cpu":
        return dist.ProcessGroupGloo(store, rank, world,
                                     datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
    os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")   # read by the constructor below
    torch.cuda.set_device(rank)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = datetime.timedelta(seconds=timeout_s)
    return dist.ProcessGroupNCCL(store, rank, world, options)


class Collectives:
    """The sharded forward's collectives over one group. on_error(message) is called (and must
    raise) when one fails: rank 0 marks the engine broken; None: the error propagates (a
    worker, which then exits and reports it). stats: counted on rank 0 only."""

    def __init__(self, group, rank: int, world: int, timeout_s: float,
                 stats: CommStats | None = None,
                 on_error: Callable[[str], None] | None = None):
        self.group, self.rank, self.world = group, rank, world
        self.stats, self.on_error = stats, on_error
        timeout = datetime.timedelta(seconds=timeout_s)
        self._reduce = dist.AllreduceOptions()
        self._reduce.timeout = timeout
        self._gather = dist.GatherOptions()
        self._gather.rootRank, self._gather.timeout = 0, timeout

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the ranks, in place."""
        started = time.perf_counter()
        self._wait(lambda: self.group.allreduce([tensor], self._reduce), "all-reduce")
        if self.stats is not None:
            self.stats.calls += 1
            self.stats.tensor_bytes += tensor.numel() * tensor.element_size()
            self.stats.seconds += time.perf_counter() - started

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `tensor` (same shape on all) on rank 0, in rank order; None elsewhere."""
        started = time.perf_counter()
        parts = [torch.empty_like(tensor) for _ in range(self.world)] if self.rank == 0 else None
        self._wait(lambda: self.group.gather([parts] if parts else [], [tensor], self._gather),
                   "gather")
        if self.stats is not None:
            self.stats.gather_calls += 1
            self.stats.gather_bytes += self.world * tensor.numel() * tensor.element_size()
            self.stats.gather_seconds += time.perf_counter() - started
        return parts

    def barrier(self, device) -> None:
        """One all-reduce of one number on every rank, not counted: the group works (NCCL
        builds its communicator at its first collective)."""
        one = torch.ones(1, device=device)
        self._wait(lambda: self.group.allreduce([one], self._reduce), "barrier all-reduce")

    def _wait(self, start, what: str) -> None:
        try:
            start().wait()
        except RuntimeError as exc:     # gloo timeouts and NCCL's DistBackendError alike
            if self.on_error is None:
                raise
            self.on_error(f"{what} failed ({exc})")
