"""Training checkpoints: everything a resumed run needs to continue bit-exactly.

    OUT/checkpoints/step-00000040/
        trainable.safetensors   the trained parameters (by name)
        rng.safetensors         torch CPU (and CUDA) generator states
        optimizer.pt            AdamW state (torch.save: our own file, loaded weights_only=True)
        state.json              step, data position, python/numpy RNG states, the schedule's step
    OUT/checkpoints/latest      the name of the newest complete checkpoint

A checkpoint is written into a temporary folder that is renamed into place when complete, and
`latest` is replaced atomically (os.replace) after that, so a crash mid-save leaves the previous
checkpoint as the latest one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lorafleet.errors import TrainingError

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
KEEP_CHECKPOINTS = 2  # the newest two: the latest plus one in case it is somehow unreadable


@dataclass
class Checkpoint:
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    data_position: dict
    rng: dict           # {"torch": ByteTensor, "cuda": [ByteTensor], "python": ..., "numpy": ...}
    extra: dict          # anything json-able the trainer wants back (e.g. last loss)


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


def save_checkpoint(out_dir: str | Path, ckpt: Checkpoint) -> Path:
    """Write atomically; returns the checkpoint folder."""
    root = Path(out_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{ckpt.step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu().clone() for k, v in ckpt.trainable.items()},
              str(tmp / "trainable.safetensors"))
    rng_tensors = {"torch": ckpt.rng["torch"]}
    rng_tensors.update({f"cuda_{i}": s for i, s in enumerate(ckpt.rng["cuda"])})
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    torch.save(ckpt.optimizer, tmp / "optimizer.pt")
    _write_json(tmp / "state.json", {
        "step": ckpt.step, "data_position": ckpt.data_position, "scheduler": {"step": ckpt.step},
        "python_rng": ckpt.rng["python"], "numpy_rng": ckpt.rng["numpy"],
        "n_cuda": len(ckpt.rng["cuda"]), "extra": ckpt.extra})
    if final.exists():  # a previous attempt at this very step (e.g. an interrupt right after)
        shutil.rmtree(final)
    os.rename(tmp, final)
    pointer_tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    pointer_tmp.write_text(name)
    os.replace(pointer_tmp, root / LATEST)
    _prune(root, keep=KEEP_CHECKPOINTS)
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    # Temp folders / pointer files left by a process that crashed mid-save (a resumed run has
    # another pid, so nothing else would remove them). Only the main process saves: none is live.
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


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    rng_tensors = load_file(str(path / "rng.safetensors"))
    rng = {"torch": rng_tensors["torch"],
           "cuda": [rng_tensors[f"cuda_{i}"] for i in range(state["n_cuda"])],
           "python": state["python_rng"], "numpy": state["numpy_rng"]}
    # weights_only: never unpickle arbitrary objects, even from a folder we wrote.
    optimizer = torch.load(path / "optimizer.pt", weights_only=True)
    return Checkpoint(step=state["step"], trainable=load_file(str(path / "trainable.safetensors")),
                      optimizer=optimizer, data_position=state["data_position"], rng=rng,
                      extra=state.get("extra", {}))
