"""Training checkpoints: everything a resumed run needs to continue bit-exactly.

    OUT/checkpoints/step-00000040/
        trainable.safetensors   the trained parameters (by name); one process or DDP
        optimizer.pt            AdamW state (torch.save: our own file, loaded weights_only=True)
        sharded/                FSDP instead of the two above: each process's shard of the
                                trained parameters and optimizer state (torch.distributed
                                .checkpoint; its .metadata is a pickle of our own writing)
        rng-<rank>.safetensors  each process's torch CPU (and CUDA) generator states
        state.json              step, world size, data position, the trained tensors' names,
                                each process's python/numpy RNG states
    OUT/checkpoints/latest      the name of the newest complete checkpoint

Every process takes part: each writes its own RNG state (dropout draws differ between
processes), under FSDP its shard, and the main process the rest. Everything is written into a
temporary folder that is renamed into place when complete, and `latest` is replaced atomically
(os.replace) after that, so a crash mid-save leaves the previous checkpoint as the latest one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lorafleet.errors import TrainingError
from lorafleet.train import distributed as dist

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
SHARDED = "sharded"
KEEP_CHECKPOINTS = 2  # the newest two: the latest plus one in case it is somehow unreadable


@dataclass
class Checkpoint:
    step: int
    trainable: dict[str, torch.Tensor] | None  # None when sharded (FSDP)
    optimizer: dict | None
    data_position: dict
    rng: dict           # this process's: {"torch", "cuda": [...], "python", "numpy"}
    extra: dict          # anything json-able the trainer wants back (e.g. last loss)
    trainable_names: list[str] = field(default_factory=list)
    world_size: int = 1


def capture_rng() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


def save_checkpoint(out_dir: str | Path, ckpt: Checkpoint,
                    write_sharded: Callable[[Path], None] | None = None,
                    write_adapter: Callable[[Path], None] | None = None,
                    keep: int = KEEP_CHECKPOINTS) -> Path:
    """Write atomically; every process calls this. `write_sharded(folder)` (FSDP) is a
    collective that writes each process's shard; `write_adapter(folder)` (main process) writes
    the servable artifact as `adapter/` inside the checkpoint. The newest `keep` checkpoints
    stay. Returns the checkpoint folder."""
    root = Path(out_dir) / CHECKPOINT_DIR
    name = f"step-{ckpt.step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}"  # one name on every process (not the pid: they differ)
    rank = dist.rank()
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    rng_tensors = {"torch": ckpt.rng["torch"]}
    rng_tensors.update({f"cuda_{i}": s for i, s in enumerate(ckpt.rng["cuda"])})
    save_file(rng_tensors, str(tmp / f"rng-{rank}.safetensors"))
    _write_json(tmp / f"rng-{rank}.json", {"python": ckpt.rng["python"],
                                           "numpy": ckpt.rng["numpy"],
                                           "n_cuda": len(ckpt.rng["cuda"])})
    if write_sharded is not None:
        write_sharded(tmp / SHARDED)
    dist.barrier()
    if dist.is_main():
        if ckpt.trainable is not None:
            save_file({k: v.detach().contiguous().cpu().clone()
                       for k, v in ckpt.trainable.items()}, str(tmp / "trainable.safetensors"))
            torch.save(ckpt.optimizer, tmp / "optimizer.pt")
        if write_adapter is not None:
            write_adapter(tmp / "adapter")
        _write_json(tmp / "state.json", {
            "step": ckpt.step, "world_size": ckpt.world_size,
            "data_position": ckpt.data_position, "scheduler": {"step": ckpt.step},
            "trainable_names": ckpt.trainable_names, "extra": ckpt.extra})
        if final.exists():  # a previous attempt at this very step (e.g. an interrupt right after)
            shutil.rmtree(final)
        os.rename(tmp, final)
        pointer_tmp = root / f".{LATEST}.tmp-{os.getpid()}"
        pointer_tmp.write_text(name)
        os.replace(pointer_tmp, root / LATEST)
        _prune(root, keep=keep)
    dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    # Temp folders / pointer files left by a run that crashed mid-save (nothing else would
    # remove them). Called by the main process after every process finished writing: none is
    # live.
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(f".{LATEST}.tmp-*"):
        stale.unlink(missing_ok=True)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    pointer = Path(out_dir) / CHECKPOINT_DIR / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise TrainingError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def load_checkpoint(path: str | Path, rank: int = 0, world_size: int = 1) -> Checkpoint:
    """The checkpoint as process `rank` of `world_size` resumes it. A checkpoint written by
    another number of processes is refused: its data split and RNG states belong to those."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    saved_world = state.get("world_size", 1)
    if saved_world != world_size:
        raise TrainingError(f"--resume: {path} was written by {saved_world} process(es); this "
                            f"run has {world_size}. Resume with torchrun --nproc_per_node "
                            f"{saved_world} (or 1 process without torchrun)")
    rng_tensors = load_file(str(path / f"rng-{rank}.safetensors"))
    rng_state = json.loads((path / f"rng-{rank}.json").read_text())
    rng = {"torch": rng_tensors["torch"],
           "cuda": [rng_tensors[f"cuda_{i}"] for i in range(rng_state["n_cuda"])],
           "python": rng_state["python"], "numpy": rng_state["numpy"]}
    trainable = optimizer = None
    if (path / "trainable.safetensors").is_file():
        trainable = load_file(str(path / "trainable.safetensors"))
        # weights_only: never unpickle arbitrary objects, even from a folder we wrote.
        optimizer = torch.load(path / "optimizer.pt", weights_only=True)
    return Checkpoint(step=state["step"], trainable=trainable, optimizer=optimizer,
                      data_position=state["data_position"], rng=rng,
                      extra=state.get("extra", {}),
                      trainable_names=state.get("trainable_names", []), world_size=saved_world)


def save_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       folder: Path) -> None:
    """FSDP: each process writes its shard of the trained parameters and the optimizer state
    (frozen parameters are not state: they come from the base model again)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer,
                                              options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))


def load_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                         set_state_dict)
    if not folder.is_dir():
        raise TrainingError(f"--resume: {folder.parent} holds no sharded (FSDP) state; it was "
                            "written without --parallel fsdp")
    model_state, optim_state = get_state_dict(
        model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    # strict=False: the frozen parameters are not in the checkpoint (they come from the base)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
