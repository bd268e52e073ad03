"""Merging: W = W0 + scaling * B A (LoRA sec. 4.1), so a single-task model has no added latency.

Two levels:
  - on a live model: `merge(model, name)`, `unmerge(model)`, `unload(model)`;
  - on a Hugging Face checkpoint folder, by tensor name alone (no model code):
    `merge_checkpoint(base_dir, adapter_dir, out_dir)` writes a full checkpoint folder.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorafleet.errors import AdapterError, ConfigError, ModelLoadError, ShapeError
from lorafleet.lora import dora
from lorafleet.lora.combine import check_weights
from lorafleet.lora.inject import _adapter_params, lora_layers
from lorafleet.lora.layers import LoraLayer, ModulesToSave, delta_weight
from lorafleet.models.dtype import AUTO, parse_dtype
from lorafleet.models.loader import Progress
from lorafleet.models.modules import replace_submodule

log = logging.getLogger(__name__)

# Families whose checkpoints store linear weights [in, out] (transformers' Conv1D).
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt"}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PREFIX = "base_model.model."


# -- live model ----------------------------------------------------------------------------------
def merge(model: nn.Module, adapter_name: str) -> None:
    """Add adapter `adapter_name` into the base weights of every layer that has it, and make it
    the active adapter (so forward does not add it twice)."""
    layers = [(name, layer) for name, layer in lora_layers(model) if adapter_name in layer.r]
    if not layers:
        raise AdapterError(f"cannot merge: the model has no adapter named {adapter_name!r}")
    for name, layer in layers:   # checked before any layer changes: a merge is all or nothing
        for param in _adapter_params(layer, adapter_name):
            if not bool(torch.isfinite(param).all()):
                raise AdapterError(f"cannot merge adapter {adapter_name!r}: module {name!r} "
                                   f"holds NaN or Inf weights")
    layers = [layer for _, layer in layers]
    for layer in layers:
        layer.merge(adapter_name)
    for _, layer in lora_layers(model):
        layer.active_adapter = adapter_name


def unmerge(model: nn.Module) -> None:
    """Subtract every merged adapter from the base weights (restores them within float rounding)."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def unload(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Merge `adapter_name` (if given) and put the plain base modules back (PEFT's
    `merge_and_unload`). modules_to_save wrappers are replaced by that adapter's copy."""
    if adapter_name is not None:
        merge(model, adapter_name)
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            replace_submodule(model, name, module.base_layer)
        elif isinstance(module, ModulesToSave):
            keep = module.modules_to_save[adapter_name] if adapter_name in module.modules_to_save \
                else module.original_module
            replace_submodule(model, name, keep)
    if hasattr(model, "lora_configs"):
        model.lora_configs = {}
    return model


# -- checkpoint folder ---------------------------------------------------------------------------
@dataclass
class MergeReport:
    out_dir: Path
    merged: list[str]      # checkpoint keys that received a low-rank update
    replaced: list[str]    # checkpoint keys replaced outright (biases, modules_to_save)
    files: list[str]       # safetensors files written


def _checkpoint_key(name: str, keys: set[str], adapter_key: str) -> str:
    """Module-derived name -> the checkpoint's key. GPT-2 checkpoints may drop the
    `transformer.` prefix that module names carry, so a unique suffix match is accepted."""
    if name in keys:
        return name
    matches = [k for k in keys if name.endswith("." + k) or k.endswith("." + name)]
    if len(matches) == 1:
        return matches[0]
    raise AdapterError(f"adapter key {adapter_key!r}: the base checkpoint has no tensor "
                       f"{name!r}" + (f" (ambiguous: {matches[:4]})" if matches else ""))


def _oriented(delta: torch.Tensor, weight_shape: tuple, fan_in_fan_out: bool, key: str):
    """Lay `delta` [out, in] out like the checkpoint's weight ([in, out] for Conv1D)."""
    shape, transposed = tuple(delta.shape), tuple(delta.T.shape)
    if shape == transposed:  # square: only the layout flag can tell
        return delta.T if fan_in_fan_out else delta
    if weight_shape == shape:
        return delta
    if weight_shape == transposed:
        return delta.T
    raise ShapeError(f"{key}: expected a weight of shape {shape} (or {transposed} for Conv1D), "
                     f"found {weight_shape}")


def _base_files(base_dir: Path) -> tuple[list[str], dict | None]:
    index_file = base_dir / INDEX_NAME
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        return sorted(set(index["weight_map"].values())), index
    if (base_dir / SINGLE_NAME).is_file():
        return [SINGLE_NAME], None
    pickled = [p.name for p in base_dir.glob("*.bin")] if base_dir.is_dir() else []
    raise ModelLoadError(f"{base_dir}: no {SINGLE_NAME} or {INDEX_NAME}"
                         + (f" (found {pickled}; safetensors is required)" if pickled else ""))


def merge_checkpoint(base_dir: str | Path, adapter_dir: str | Path | Sequence[str | Path],
                     out_dir: str | Path, dtype: str | torch.dtype | None = None,
                     weights: Sequence[float] | None = None,
                     progress: Progress | None = None) -> MergeReport:
    """Merge PEFT adapter(s) into a Hugging Face checkpoint folder by tensor-name arithmetic and
    write a full checkpoint (same sharding, config and tokenizer files copied) to `out_dir`.
    Several adapters: W = W0 + sum_i weights[i] * s_i B_i A_i (weights default to 1 each).
    `dtype`: output dtype of floating tensors (default: keep the checkpoint's).
    `progress(done, total)`: called per checkpoint tensor written, from (0, total)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from lorafleet.lora.peft_format import load_peft

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if dtype is not None:
        dtype = parse_dtype(dtype)   # ConfigError naming the accepted names
        if dtype == AUTO:
            dtype = None             # "auto": keep the checkpoint's
    if out_dir.exists() and any(out_dir.iterdir()):
        raise AdapterError(f"{out_dir}: output folder exists and is not empty")
    dirs = [adapter_dir] if isinstance(adapter_dir, (str, Path)) else list(adapter_dir)
    if not dirs:
        raise ConfigError("adapter_dir: name at least one adapter folder to merge")
    weights = [1.0] * len(dirs) if weights is None else list(weights)
    check_weights([str(d) for d in dirs], weights)
    adapters = [load_peft(d) for d in dirs]   # refuses non-float and non-finite tensors
    for d, a, w in zip(dirs, adapters, weights):
        if a.config.use_dora and (len(dirs) > 1 or w != 1):
            raise AdapterError(f"adapter {str(d)!r}: use_dora=true: a DoRA adapter rescales the "
                               "merged weight, so it merges alone and with weight 1")
    files, index = _base_files(base_dir)
    model_type = None
    if (base_dir / "config.json").is_file():
        model_type = json.loads((base_dir / "config.json").read_text()).get("model_type")

    with_keys = {}
    for f in files:
        with safe_open(base_dir / f, framework="pt") as handle:
            with_keys.update(dict.fromkeys(handle.keys(), f))
    keys = set(with_keys)
    # checkpoint key -> [(adapter key, delta [out, in], is_embedding, magnitude, fan_in_fan_out)]
    updates: dict[str, list[tuple]] = {}
    replace_keys: dict[str, torch.Tensor] = {}
    for d, adapter, w in zip(dirs, adapters, weights):
        fan_in_fan_out = adapter.config.fan_in_fan_out or model_type in CONV1D_MODEL_TYPES
        # Besides the LoRA pairs, a PEFT file may replace checkpoint tensors outright (biases,
        # modules_to_save copies); PEFT's copy of an adapted embedding's base weight is skipped.
        for key in adapter.extras:
            if key.endswith(".base_layer.weight"):
                continue
            target = _checkpoint_key(key[len(PREFIX):].replace(".base_layer.", "."), keys, key)
            if target in replace_keys:
                raise AdapterError(f"adapter {str(d)!r}: {key} replaces {target}, which another "
                                   "adapter replaces too; merge them one at a time")
            replace_keys[target] = adapter.tensors[key]
        for module in adapter.modules.values():
            adapter_key = PREFIX + module.name
            delta = delta_weight(module.A.float(), module.B.float(), module.scaling) * w
            if module.embedding:
                delta = delta.T  # embedding tables are [vocab, dim]
            target = _checkpoint_key(module.name + ".weight", keys, adapter_key)
            updates.setdefault(target, []).append(
                (adapter_key, delta, module.embedding, module.magnitude, fan_in_fan_out))

    out_dir.mkdir(parents=True, exist_ok=True)
    merged, replaced, total_size, done = [], [], 0, 0
    if progress is not None:
        progress(0, len(keys))
    for f in files:
        shard = load_file(base_dir / f)
        for key in list(shard):
            weight = shard[key]
            if key in updates:
                new = weight.float()
                for adapter_key, delta_oi, embedding, magnitude, fan_in_fan_out in updates[key]:
                    delta = delta_oi if embedding else _oriented(delta_oi, tuple(weight.shape),
                                                                 fan_in_fan_out, key)
                    if tuple(delta.shape) != tuple(weight.shape):
                        raise ShapeError(f"{adapter_key}: expected update shape "
                                         f"{tuple(weight.shape)} for {key}, found "
                                         f"{tuple(delta.shape)}")
                    if magnitude is not None:   # DoRA: W' = m * (W0 + dW) / ||W0 + dW||_row
                        transposed = delta is not delta_oi
                        base = new.T if transposed else new
                        new, _ = dora.merged_weight(base, delta_oi, magnitude)
                        new = new.T if transposed else new
                    else:
                        new = new + delta
                    if not torch.isfinite(new).all():
                        raise AdapterError(f"{adapter_key}: merging gives NaN/Inf in {key}")
                shard[key] = new.to(weight.dtype)
                merged.append(key)
            elif key in replace_keys:
                new = replace_keys[key]
                if tuple(new.shape) != tuple(weight.shape):
                    raise ShapeError(f"adapter tensor for {key}: expected shape "
                                     f"{tuple(weight.shape)}, found {tuple(new.shape)}")
                shard[key] = new.to(weight.dtype)
                replaced.append(key)
            if dtype is not None and shard[key].is_floating_point():
                shard[key] = shard[key].to(dtype)
            shard[key] = shard[key].contiguous()
            total_size += shard[key].numel() * shard[key].element_size()
            done += 1
            if progress is not None:
                progress(done, len(keys))
        save_file(shard, out_dir / f, metadata={"format": "pt"})
    if index is not None:
        index = dict(index, metadata=dict(index.get("metadata", {}), total_size=total_size))
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    for item in base_dir.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name != INDEX_NAME:
            shutil.copy2(item, out_dir / item.name)
    if dtype is not None and (out_dir / "config.json").is_file():
        cfg = json.loads((out_dir / "config.json").read_text())
        cfg["torch_dtype" if "torch_dtype" in cfg else "dtype"] = str(dtype).removeprefix("torch.")
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    log.info("merged %d tensors (%d replaced) into %s", len(merged), len(replaced), out_dir)
    return MergeReport(out_dir, merged, replaced, files)
