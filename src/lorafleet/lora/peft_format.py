"""The Hugging Face PEFT adapter folder, both ways.

    adapter_config.json          LoraConfig fields + "peft_type": "LORA"
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight        [r, in]
                                 base_model.model.<module>.lora_B.weight        [out, r]
                                 base_model.model.<module>.lora_embedding_A     [r, vocab]
                                 base_model.model.<module>.lora_embedding_B     [dim, r]
                                 base_model.model.<module>.base_layer.bias      (bias="lora_only"/"all")
                                 base_model.model.<module>.<param>              (modules_to_save)

Keys carry no adapter name (PEFT strips it on save and adds the caller's on load). Only
safetensors are read: a pickled `.bin`/`.pt` file can run arbitrary code when loaded.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafleet.errors import AdapterError, ShapeError

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


# -- files ---------------------------------------------------------------------------------------
def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a PEFT adapter folder -> (adapter_config dict, {PEFT key: tensor}).
    The config is validated (peft_type "LORA", known field values) but returned as the raw dict."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from lorafleet.lora.config import LoraConfig

    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: not a folder (expected a PEFT adapter folder with "
                           f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterError(f"{path}: missing {CONFIG_NAME}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{config_file}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    LoraConfig.from_dict(config, source=str(config_file))
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise AdapterError(
                f"{path}: found {pickled} but no {WEIGHTS_NAME}; lorafleet loads safetensors "
                "only (pickled weights can run arbitrary code when loaded). Convert it once in a "
                "trusted environment, e.g. PeftModel.from_pretrained(...).save_pretrained(dir, "
                "safe_serialization=True)")
        raise AdapterError(f"{path}: missing {WEIGHTS_NAME}")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{weights}: not a readable safetensors file ({exc})") from None
    return config, tensors


def write_adapter(path: str | Path, config, tensors: dict[str, torch.Tensor]) -> Path:
    """Write a PEFT adapter folder. `config`: a LoraConfig or an adapter_config dict."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    data = config if isinstance(config, dict) else config.to_peft_dict()
    (path / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    # safetensors refuses views that share storage; each tensor gets its own contiguous copy.
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
              path / WEIGHTS_NAME, metadata={"format": "pt"})
    return path


# -- model <-> PEFT keys -------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, adapter_name: str = "default",
                       bias: str = "none") -> dict[str, torch.Tensor]:
    """The tensors PEFT would save for `adapter_name` of `model`, under PEFT's key names."""
    from lorafleet.lora.layers import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave

    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.r:
            if isinstance(module, LoraLinear):
                out[f"{PREFIX}{name}.lora_A.weight"] = module.lora_A[adapter_name].weight
                out[f"{PREFIX}{name}.lora_B.weight"] = module.lora_B[adapter_name].weight
            elif isinstance(module, LoraEmbedding):
                out[f"{PREFIX}{name}.lora_embedding_A"] = module.lora_embedding_A[adapter_name]
                out[f"{PREFIX}{name}.lora_embedding_B"] = module.lora_embedding_B[adapter_name]
            base_bias = getattr(module.base_layer, "bias", None)
            if bias == "lora_only" and isinstance(base_bias, torch.Tensor):
                out[f"{PREFIX}{name}.base_layer.bias"] = base_bias
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for key, tensor in module.modules_to_save[adapter_name].state_dict().items():
                out[f"{PREFIX}{name}.{key}"] = tensor
    if bias == "all":
        for name, param in model.named_parameters():
            if "bias" in name.split(".")[-1] and ".modules_to_save." not in name:
                out[f"{PREFIX}{name.replace('.original_module.', '.')}"] = param
    if not any(".lora_" in k for k in out):
        raise AdapterError(f"the model has no adapter named {adapter_name!r}")
    return {k: v.detach() for k, v in out.items()}


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor],
                            adapter_name: str = "default") -> None:
    """Copy PEFT-keyed tensors into adapter `adapter_name` of `model` (already injected).
    Raises ShapeError (key, expected, found) and AdapterError for keys that fit no module or
    adapter weights the file lacks."""
    from lorafleet.lora.layers import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave

    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    expected: dict[str, torch.Tensor] = {}  # what must be in the file: every A and B
    for name, module in modules.items():
        if isinstance(module, LoraLinear) and adapter_name in module.r:
            expected[f"{name}.lora_A.weight"] = module.lora_A[adapter_name].weight
            expected[f"{name}.lora_B.weight"] = module.lora_B[adapter_name].weight
        elif isinstance(module, LoraEmbedding) and adapter_name in module.r:
            expected[f"{name}.lora_embedding_A"] = module.lora_embedding_A[adapter_name]
            expected[f"{name}.lora_embedding_B"] = module.lora_embedding_B[adapter_name]
    saved_wrappers = {n: m for n, m in modules.items()
                      if isinstance(m, ModulesToSave) and adapter_name in m.modules_to_save}

    seen = set()
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterError(f"adapter key {key!r}: expected PEFT's prefix {PREFIX!r}")
        name = key[len(PREFIX):]
        if name in expected:
            target = expected[name]
            seen.add(name)
        elif name.endswith(".base_layer.weight") and isinstance(
                modules.get(name[:-len(".base_layer.weight")]), LoraLayer):
            # PEFT also saves the full base embedding when it adapts one; it is the base's.
            _warn_if_differs(key, tensor, params.get(name))
            continue
        else:
            wrapper = next((w for w in saved_wrappers if name.startswith(w + ".")), None)
            if wrapper is not None:
                state = saved_wrappers[wrapper].modules_to_save[adapter_name].state_dict(keep_vars=True)
                target = state.get(name[len(wrapper) + 1:])
            else:
                target = params.get(name)
            if target is None or not _is_adapter_extra(name, wrapper):
                raise AdapterError(f"adapter key {key!r} fits no adapted module of adapter "
                                   f"{adapter_name!r} in this model (is it for another base "
                                   "model or another target_modules?)")
        if tuple(tensor.shape) != tuple(target.shape):
            raise ShapeError(f"adapter key {key!r}: expected shape {tuple(target.shape)} for this "
                             f"model, found {tuple(tensor.shape)}")
        target.data.copy_(tensor.to(target.dtype))
    missing = sorted(set(expected) - seen)
    if missing:
        raise AdapterError(f"adapter file lacks {len(missing)} tensors the config targets, "
                           f"e.g. {[PREFIX + m for m in missing[:4]]}")


def _is_adapter_extra(name: str, wrapper: str | None) -> bool:
    """Besides A/B, a PEFT file may carry biases and modules_to_save copies; nothing else."""
    return wrapper is not None or name.split(".")[-1] == "bias"


def _warn_if_differs(key: str, tensor: torch.Tensor, base: torch.Tensor | None) -> None:
    if base is None or base.shape != tensor.shape or not torch.equal(base, tensor.to(base.dtype)):
        log.warning("adapter key %r holds a copy of a base weight that differs from this model's; "
                    "ignored (lorafleet never changes base weights when loading an adapter)", key)


# -- the user-facing pair ------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> Path:
    """Write adapter `adapter_name` of `model` as a PEFT folder (`PeftModel.from_pretrained` loads it)."""
    import dataclasses

    config = adapter_config(model, adapter_name)
    if config.base_model_name_or_path is None:  # as PEFT does, name the base when it is known
        base = getattr(model, "name_or_path", None) or getattr(
            getattr(model, "config", None), "_name_or_path", None)
        if isinstance(base, str) and base:
            config = dataclasses.replace(config, base_model_name_or_path=base)
    return write_adapter(path, config, adapter_state_dict(model, adapter_name, config.bias))


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> nn.Module:
    """Load a PEFT adapter folder into `model` as `adapter_name`, injecting its LoRA layers first
    (from the folder's config) when the model does not have that adapter yet."""
    from lorafleet.lora.config import LoraConfig
    from lorafleet.lora.inject import adapter_names, inject_lora

    raw, tensors = read_adapter(path)
    config = LoraConfig.from_dict(raw, source=str(Path(path) / CONFIG_NAME))
    if adapter_name not in adapter_names(model):
        inject_lora(model, config, adapter_name)
    load_adapter_state_dict(model, tensors, adapter_name)
    log.info("loaded adapter %r from %s (%d tensors)", adapter_name, path, len(tensors))
    return model


def adapter_config(model: nn.Module, adapter_name: str = "default"):
    """The LoraConfig adapter `adapter_name` was injected with (recorded by `inject_lora`)."""
    configs = getattr(model, "lora_configs", {})
    if adapter_name not in configs:
        raise AdapterError(f"the model has no adapter named {adapter_name!r} "
                           f"(it has {sorted(configs)})")
    return configs[adapter_name]


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """A summary of a PEFT adapter folder: rank, alpha, targets, parameter count, size on disk."""
    path = Path(path)
    config, tensors = read_adapter(path)
    modules: dict[str, int] = {}  # adapted module -> rank
    for key, tensor in tensors.items():
        for suffix in (".lora_A.weight", ".lora_embedding_A"):
            if key.endswith(suffix):
                modules[key[len(PREFIX):-len(suffix)]] = int(tensor.shape[0])
    return {
        "path": str(path),
        "peft_type": config.get("peft_type"),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "use_rslora": bool(config.get("use_rslora", False)),
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {},
        "target_modules": config.get("target_modules"),
        "adapted_modules": len(modules),
        "module_types": sorted({name.split(".")[-1] for name in modules}),
        "ranks": sorted(set(modules.values())),
        "bias": config.get("bias", "none"),
        "modules_to_save": config.get("modules_to_save"),
        "parameters": sum(t.numel() for t in tensors.values()),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "size_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
    }
