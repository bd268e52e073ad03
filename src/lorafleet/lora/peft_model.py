"""A model's adapters <-> PEFT keys: `adapter_state_dict` (the tensors PEFT would save, under
its key names), `load_adapter_state_dict` (the way back, checked key by key), and the user-facing
`save_adapter` / `load_adapter`. The folder format itself (reading, checking, writing, header-only
inspection) is lora/peft_format.py's; this module adds what needs the LoRA layers.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from lorafleet.errors import AdapterError, ShapeError
from lorafleet.lora.init import convert_to_lora, initial_tensors
from lorafleet.lora.inject import adapter_names, inject_lora
from lorafleet.lora.layers import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave
from lorafleet.lora.peft_format import PREFIX, load_peft, write_adapter

log = logging.getLogger(__name__)


# -- model <-> PEFT keys -------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, adapter_name: str = "default",
                       bias: str = "none") -> dict[str, torch.Tensor]:
    """The tensors PEFT would save for `adapter_name` of `model`, under PEFT's key names."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.r:
            for key, tensor in _lora_tensors(name, module, adapter_name).items():
                out[PREFIX + key] = tensor
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
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    expected: dict[str, torch.Tensor] = {}  # what must be in the file: every A and B
    for name, module in modules.items():
        if isinstance(module, LoraLayer) and adapter_name in module.r:
            expected.update(_lora_tensors(name, module, adapter_name))
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


def _lora_tensors(name: str, module: LoraLayer, adapter_name: str) -> dict[str, torch.Tensor]:
    """Adapter `adapter_name`'s own tensors in LoRA module `name`, by PEFT key less PREFIX: the
    one place both directions (save and load) name them."""
    if isinstance(module, LoraLinear):
        out = {f"{name}.lora_A.weight": module.lora_A[adapter_name].weight,
               f"{name}.lora_B.weight": module.lora_B[adapter_name].weight}
        if module.is_dora(adapter_name):
            out[f"{name}.lora_magnitude_vector"] = module.lora_magnitude_vector[adapter_name]
        return out
    if isinstance(module, LoraEmbedding):
        return {f"{name}.lora_embedding_A": module.lora_embedding_A[adapter_name],
                f"{name}.lora_embedding_B": module.lora_embedding_B[adapter_name]}
    return {}


def _is_adapter_extra(name: str, wrapper: str | None) -> bool:
    """Besides A/B, a PEFT file may carry biases and modules_to_save copies; nothing else."""
    return wrapper is not None or name.split(".")[-1] == "bias"


def _warn_if_differs(key: str, tensor: torch.Tensor, base: torch.Tensor | None) -> None:
    if base is None or base.shape != tensor.shape or not torch.equal(base, tensor.to(base.dtype)):
        log.warning("adapter key %r holds a copy of a base weight that differs from this model's; "
                    "ignored (lorafleet never changes base weights when loading an adapter)", key)


# -- the user-facing pair ------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default",
                 path_initial_model_for_weight_conversion: str | Path | None = None,
                 convert_to_lora: bool = False) -> Path:
    """Write adapter `adapter_name` of `model` as a PEFT folder (`PeftModel.from_pretrained` loads
    it). An adapter trained from PiSSA / OLoRA (whose init rewrote the base): with
    `convert_to_lora` or PEFT's `path_initial_model_for_weight_conversion`, written as the equal
    plain LoRA of rank 2r over the original base (lora/init.py)."""
    if convert_to_lora or path_initial_model_for_weight_conversion is not None:
        return _save_converted(model, path, adapter_name, path_initial_model_for_weight_conversion)

    config = adapter_config(model, adapter_name)
    if config.base_model_name_or_path is None:  # as PEFT does, name the base when it is known
        base = getattr(model, "name_or_path", None) or getattr(
            getattr(model, "config", None), "_name_or_path", None)
        if isinstance(base, str) and base:
            config = dataclasses.replace(config, base_model_name_or_path=base)
    return write_adapter(path, config, adapter_state_dict(model, adapter_name, config.bias))


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default",
                 is_trainable: bool = False) -> nn.Module:
    """Load a PEFT adapter folder into `model` as `adapter_name`, injecting its LoRA layers first
    (from the folder's config) when the model does not have that adapter yet. As PEFT's
    `from_pretrained` / `load_adapter`: frozen unless `is_trainable=True` (then its weights, the
    biases its config trains and its modules_to_save copies take gradients)."""
    adapter = load_peft(path)
    if adapter_name not in adapter_names(model):
        config = adapter.config
        if config.init_lora_weights == "loftq":   # the file holds the result; no re-quantizing
            config = dataclasses.replace(config, init_lora_weights=True)
        inject_lora(model, config, adapter_name)
        if not is_trainable:    # inject_lora froze all else and made the adapter trainable
            model.requires_grad_(False)
    load_adapter_state_dict(model, adapter.tensors, adapter_name)
    log.info("loaded adapter %r from %s (%d tensors)", adapter_name, path, len(adapter.tensors))
    return model


def _save_converted(model: nn.Module, path: str | Path, adapter_name: str,
                    initial_path: str | Path | None) -> Path:
    """`save_adapter` of a PiSSA / OLoRA-trained adapter as the equal plain LoRA over the original
    base; A0, B0 from `initial_path` (a folder saved before training, PEFT's way) or else from
    what the init recorded in the model."""
    config = adapter_config(model, adapter_name)
    if initial_path is not None:
        initial = load_peft(initial_path).tensors
    else:
        initial = initial_tensors(model, adapter_name)
        if not initial:
            raise AdapterError(f"adapter {adapter_name!r}: init_lora_weights="
                               f"{config.init_lora_weights!r} did not change the base, or the "
                               "initial weights are unknown; nothing to convert (pass the folder "
                               "saved before training as path_initial_model_for_weight_conversion)")
    converted, tensors = convert_to_lora(config, adapter_state_dict(model, adapter_name,
                                                                    config.bias), initial)
    return write_adapter(path, converted, tensors)


def adapter_config(model: nn.Module, adapter_name: str = "default"):
    """The LoraConfig adapter `adapter_name` was injected with (recorded by `inject_lora`)."""
    configs = getattr(model, "lora_configs", {})
    if adapter_name not in configs:
        raise AdapterError(f"the model has no adapter named {adapter_name!r} "
                           f"(it has {sorted(configs)})")
    return configs[adapter_name]
