"""Adapter operations on a live model, PEFT's `PeftModel` methods as functions:

    add_weighted_adapter(model, ["a", "b"], [0.7, 0.3], "mix", "svd")   (combine.py)
    with disable_adapter(model): ...                                      the base alone
    delete_adapter(model, "a")
    set_adapter(model, ["a", "b"])                                        (inject.py) several active
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence

from torch import nn

from lorafleet.errors import AdapterError
from lorafleet.lora.combine import combine_adapters, combined_config
from lorafleet.lora.inject import adapter_names, inject_lora, lora_layers
from lorafleet.lora.layers import LoraLayer, ModulesToSave
from lorafleet.lora.peft_format import PeftAdapter, parse_adapter
from lorafleet.lora.peft_model import adapter_config, adapter_state_dict, load_adapter_state_dict

log = logging.getLogger(__name__)


def model_adapter(model: nn.Module, name: str) -> PeftAdapter:
    """Adapter `name` of `model` as a parsed PEFT adapter (config + tensors, no file)."""
    config = adapter_config(model, name)
    tensors = adapter_state_dict(model, name, config.bias)
    return parse_adapter(config, tensors, f"adapter {name!r}")


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float],
                         adapter_name: str, combination_type: str = "svd", **options) -> nn.Module:
    """Add adapter `adapter_name` to `model`, the combination of `adapters` (combine.py; options:
    svd_rank, svd_clamp, svd_full_matrices, density, majority_sign_method). As PEFT: the new
    adapter is injected first, then filled module by module in the model's order; the active
    adapter does not change."""
    known = adapter_names(model)
    missing = [a for a in adapters if a not in known]
    if missing:
        raise AdapterError(f"adapters {missing} do not exist in this model (it has {known})")
    if adapter_name in known:
        raise AdapterError(f"adapter {adapter_name!r} already exists in this model")
    parsed = {a: model_adapter(model, a) for a in adapters}
    config = combined_config(parsed, weights, combination_type, options.get("svd_rank"),
                             options.get("density"), options.get("majority_sign_method", "total"))
    active = {id(m): m.active_adapter for m in model.modules()
              if isinstance(m, (LoraLayer, ModulesToSave))}
    grads = {id(p): p.requires_grad for p in model.parameters()}
    # Injected with the first adapter's init (random or not), as PEFT does: the same draws from
    # torch's RNG, so DARE's masks that follow coincide with PEFT's for the same seed.
    first = parsed[adapters[0]].config.init_lora_weights
    inject_lora(model, dataclasses.replace(
        config, init_lora_weights=first if first in (True, False, "gaussian") else True),
        adapter_name)
    model.lora_configs[adapter_name] = config
    order = [name for name, _ in model.named_modules()]
    _, tensors = combine_adapters(parsed, weights, combination_type, module_order=order, **options)
    load_adapter_state_dict(model, tensors, adapter_name)
    for module in model.modules():   # inject_lora made it active and trainable; PEFT does not
        if isinstance(module, (LoraLayer, ModulesToSave)) and id(module) in active:
            module.active_adapter = active[id(module)]
    for param in model.parameters():
        param.requires_grad_(grads.get(id(param), False))
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter `adapter_name` from every layer (PEFT's `delete_adapter`)."""
    if adapter_name not in adapter_names(model):
        raise AdapterError(f"cannot delete adapter {adapter_name!r}: this model has "
                           f"{adapter_names(model)}")
    for _, layer in lora_layers(model):
        if adapter_name in layer.r:
            layer.delete_adapter(adapter_name)
    for module in model.modules():
        if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            del module.modules_to_save[adapter_name]
            if module.active_adapter == adapter_name:
                module.active_adapter = None
    getattr(model, "lora_configs", {}).pop(adapter_name, None)


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Inside this block the model computes the base alone (PEFT's `disable_adapter()`); a merged
    adapter is unmerged first, as PEFT does."""
    layers = [layer for _, layer in lora_layers(model)]
    saved = [m for m in model.modules() if isinstance(m, ModulesToSave)]
    for layer in layers:
        if layer.merged_adapters:
            log.info("disable_adapter: unmerging %s first", layer.merged_adapters)
            layer.unmerge()
        layer.disabled = True
    previous = [(m, m.active_adapter, m.row_adapters) for m in saved]
    for module in saved:
        module.active_adapter, module.row_adapters = None, None
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        for module, active, rows in previous:
            module.active_adapter, module.row_adapters = active, rows
