"""Load a Hugging Face checkpoint folder into our model classes.

gpt-fast's pattern: build the model on the meta device (no memory), check every tensor's name
and shape against the safetensors headers (before reading any weight), then read the tensors
one at a time from the memory-mapped files and `load_state_dict(assign=True)` them, so the
weights are materialized once, directly in the requested dtype and device.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from lorafleet.errors import ModelLoadError

from .config import ModelConfig
from .dtype import parse_dtype, resolve_dtype
from .gpt2 import GPT2
from .llama import Llama

log = logging.getLogger(__name__)

MODEL_CLASSES = {"llama": Llama, "gpt2": GPT2}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# Checkpoint entries that are not weights: older transformers saved GPT-2's causal mask and
# Llama's RoPE frequencies as persistent buffers.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
# STYLE.md rule 8: the library reports progress as progress(done, total) calls (done counts up
# from 0 to total); the CLI draws the bar. None (the default) reports nothing.
Progress = Callable[[int, int], None]


def build_model(config: ModelConfig, device: str | torch.device = "meta") -> nn.Module:
    """An uninitialized model for `config` (on the meta device by default: no memory)."""
    with torch.device(device):
        return MODEL_CLASSES[config.family](config)


def weight_files(path: str | Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it (single file or sharded)."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelLoadError(f"{index}: not a safetensors index ({exc})") from exc
        files = {name: path / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise ModelLoadError(f"{index} names shard {file.name!r}, which is missing")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ModelLoadError(f"{path}: only safetensors weights are loaded (pickled .bin/.pt "
                             "files can run code); convert them to model.safetensors")
    raise ModelLoadError(f"{path}: no weights ({SINGLE_FILE} or {INDEX_FILE})")


def _our_name(name: str, model: nn.Module) -> str | None:
    """Checkpoint key -> our state-dict key (None: not a weight)."""
    if name.endswith(IGNORED_SUFFIXES):
        return None
    if isinstance(model, GPT2) and not name.startswith(("transformer.", "lm_head.")):
        return "transformer." + name  # GPT2Model checkpoints (e.g. the original "gpt2")
    return name


def checkpoint_tensors(path: str | Path, model: nn.Module, dtype: torch.dtype,
                       device: str | torch.device, progress: Progress | None = None,
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """Validate names and shapes against `model` (meta is fine), then yield (our key, tensor)
    one tensor at a time, read from the memory-mapped files, cast to `dtype` on `device`.
    `progress(done, total)` is called once the consumer has taken each tensor (so the time it
    spends on one, e.g. quantizing, counts) and with (0, total) before the first."""
    files = weight_files(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    tied = model.config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight", None)
    names: dict[str, tuple[str, Path]] = {}  # our key -> (checkpoint key, file)
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, file_names in by_file.items():
        with safe_open(file, framework="pt") as f:
            present = set(f.keys())
            for name in file_names:
                if name not in present:
                    raise ModelLoadError(f"{file.name} has no tensor {name!r} (the index "
                                         "lists it there)")
                ours = _our_name(name, model)
                if ours is None or (tied and ours == "lm_head.weight"):
                    continue
                if ours not in expected:
                    raise ModelLoadError(f"{file.name}: unexpected tensor {name!r} for "
                                         f"{model.config.architecture}")
                found = tuple(f.get_slice(name).get_shape())
                if found != expected[ours]:
                    raise ModelLoadError(f"{file.name}: tensor {name!r} has shape "
                                         f"{list(found)}, expected {list(expected[ours])}")
                names[ours] = (name, file)
    missing = sorted(set(expected) - set(names))
    if missing:
        raise ModelLoadError(f"{path}: checkpoint lacks {len(missing)} tensor(s): "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if progress is not None:
        progress(0, len(names))
    for done, (ours, (name, file)) in enumerate(names.items(), start=1):
        # One open per tensor: get_tensor returns a view of the file's memory map, and every
        # page read through an open map stays in the process's RSS until the map closes. A
        # caller that converts each tensor as it arrives (NF4 streaming) thus holds one
        # tensor's pages, not the whole file's.
        with safe_open(file, framework="pt", device="cpu") as f:
            tensor = f.get_tensor(name)
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        yield ours, tensor.to(device)
        if progress is not None:
            progress(done, len(names))


def load_model(path: str | Path, dtype: str | torch.dtype = torch.float32,
               device: str | torch.device = "cpu", progress: Progress | None = None) -> nn.Module:
    """Load a checkpoint folder (config.json + safetensors) as a `Llama` or `GPT2` in eval
    mode. Parameters keep requires_grad=True, as in transformers; freezing is LoRA's job.
    `progress(done, total)`: called per tensor read (see `checkpoint_tensors`)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist")
    config = ModelConfig.from_hf(path)
    dtype = resolve_dtype(dtype, path, device)
    model = build_model(config)
    state = dict(checkpoint_tensors(path, model, dtype, device, progress))
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:  # a parameter the checks above missed: never hand out a half-loaded model
        raise ModelLoadError(f"{path}: parameters not loaded: {', '.join(leftover[:5])}")
    log.debug("loaded %s (%s) from %s", config.architecture, dtype, path)
    model.name_or_path = str(path.resolve())  # as transformers: adapters saved over it name it
    return model.eval()
