"""Put LoRA layers into any `nn.Module` (ours or a Hugging Face `transformers` model).

Target selection follows PEFT exactly (`peft.tuners.tuners_utils.check_target_module_exists`),
so a config means the same modules here and there:
  - a list of names: a module is a target if its full name equals one, or ends with "." + one;
  - a string: a regex that must match the full module name (`re.fullmatch`);
  - "all-linear": every Linear / Conv1D except the output head (QLoRA sec. 4: adapting every
    linear layer is needed to match full fine-tuning).
`layers_to_transform` keeps targets whose first numbered name segment (`layers.3.`, `h.3.`) is
listed; `rank_pattern` / `alpha_pattern` override r / alpha by PEFT's `get_pattern_key`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from lorafleet.errors import AdapterError, ConfigError, TargetError
from lorafleet.lora.config import ALL_LINEAR, LoraConfig, pattern_key  # noqa: F401 (re-export)
from lorafleet.lora.layers import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave
from lorafleet.models.modules import (linear_features, linear_layer_names, name_matches,
                                      replace_submodule)

log = logging.getLogger(__name__)

# PEFT's defaults when `target_modules` is None (peft.utils.constants), for the families we load.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}
SAMPLE_NAMES = 15  # how many existing module names a TargetError lists


@dataclass(frozen=True)
class Target:
    name: str
    module: nn.Module
    r: int
    alpha: float


# -- matching (PEFT semantics) -------------------------------------------------------------------
def layer_index(name: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """The first numbered segment of a module name (`model.layers.3.mlp` -> 3), as PEFT finds it."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match["idx"]) if match else None


def is_target(config: LoraConfig, name: str, targets: list[str] | str) -> bool:
    excluded = config.exclude_modules
    if excluded:
        if isinstance(excluded, str) and re.fullmatch(excluded, name):
            return False
        if not isinstance(excluded, str) and name_matches(name, excluded):
            return False
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", name)
                                      for m in config.modules_to_save):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True  # a full name is taken as is, without the layer filter (as in PEFT)
    if not name_matches(name, targets):
        return False
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    index = layer_index(name, config.layers_pattern)
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


# -- walking the model ---------------------------------------------------------------------------
def _candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules, not descending into LoRA layers or saved-module copies."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave)):
            inside.append(name)
        yield name, module


def _resolve_targets(model: nn.Module, config: LoraConfig) -> list[str] | str:
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ConfigError(f"target_modules: no default for model type {model_type!r}; "
                              "name the modules to adapt (or use \"all-linear\")")
        return DEFAULT_TARGETS[model_type]
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        # a projection already wrapped by another adapter's LoraLinear still counts as one
        return linear_layer_names(model, modules=(
            (n, m.base_layer if isinstance(m, LoraLinear) else m)
            for n, m in _candidate_modules(model)))
    return targets


def find_targets(model: nn.Module, config: LoraConfig) -> list[Target]:
    """The modules `config` adapts, with their rank and alpha; raises TargetError if none."""
    targets = _resolve_targets(model, config)
    found = []
    for name, module in _candidate_modules(model):
        if name and is_target(config, name, targets):
            found.append(Target(name, module, *config.rank_and_alpha(name)))
    if not found:
        names = [n for n, _ in _candidate_modules(model) if n]
        leaves = list(dict.fromkeys(n.split(".")[-1] for n in names if not n.split(".")[-1].isdigit()))
        raise TargetError(
            f"target_modules={config.target_modules!r} matched no module (exclude_modules="
            f"{config.exclude_modules!r}, layers_to_transform={config.layers_to_transform!r}). "
            f"Module names that exist include: {leaves[:SAMPLE_NAMES]}; full names such as "
            f"{names[:SAMPLE_NAMES // 3]}")
    return found


# -- injection -----------------------------------------------------------------------------------
def inject_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter `adapter_name` to every target of `config` (wrapping each target in a
    LoraLinear / LoraEmbedding that keeps the original as `.base_layer`), make it the active
    adapter, and freeze everything but it (and the biases `config.bias` asks for, and the
    `modules_to_save` copies). Returns `model`, changed in place."""
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"config: expected a LoraConfig, found {type(config).__name__}")
    if adapter_name in adapter_names(model):
        raise AdapterError(f"adapter {adapter_name!r} already exists in this model")
    targets = find_targets(model, config)
    adapted = []
    for target in targets:
        module = target.module
        if isinstance(module, LoraLayer):
            layer = module
        elif isinstance(module, nn.Embedding):
            layer = LoraEmbedding(module)
        elif linear_features(module) is not None:
            layer = LoraLinear(module)
        else:
            raise TargetError(f"{target.name}: {type(module).__name__} cannot take LoRA "
                              "(supported: Linear, Conv1D, linear-like 4-bit layers, Embedding)")
        # A 4-bit layer that replaced a GPT-2 Conv1D stores [out, in] but marks itself
        # fan_in_fan_out (its checkpoint is [in, out], as the config says): nothing to warn about.
        if (isinstance(layer, LoraLinear) and layer.fan_in_fan_out != config.fan_in_fan_out
                and getattr(layer.base_layer, "fan_in_fan_out", None) != config.fan_in_fan_out):
            log.warning("%s: fan_in_fan_out=%s in the config but the layer stores its weight "
                        "%s; using the layer's layout", target.name, config.fan_in_fan_out,
                        "[in, out]" if layer.fan_in_fan_out else "[out, in]")
        layer.add_adapter(adapter_name, target.r, target.alpha,
                          config.scaling(target.r, target.alpha), config.lora_dropout,
                          config.init_lora_weights, use_dora=config.use_dora)
        if layer is not module:
            replace_submodule(model, target.name, layer)
        adapted.append(layer)

    saved = []
    for name in config.modules_to_save or []:
        matches = [(n, m) for n, m in _candidate_modules(model) if n and name_matches(n, [name])]
        if not matches:
            raise TargetError(f"modules_to_save: {name!r} matched no module")
        for full_name, module in matches:
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                replace_submodule(model, full_name, module)
            module.add_adapter(adapter_name)
            saved.append(module.modules_to_save[adapter_name])

    for param in model.parameters():
        param.requires_grad_(False)
    for layer in adapted:
        for param in _adapter_params(layer, adapter_name):
            param.requires_grad_(True)
        if config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
            layer.base_layer.bias.requires_grad_(True)
    if config.bias == "all":
        for name, param in model.named_parameters():
            if "bias" in name.split(".")[-1]:
                param.requires_grad_(True)
    for module in saved:
        module.requires_grad_(True)
    set_adapter(model, adapter_name)
    if config.target_modules is None:  # record what the defaults resolved to
        config = dataclasses.replace(config, target_modules=sorted(
            {t.name.split(".")[-1] for t in targets}))
    # save_adapter writes this config next to the weights.
    if not isinstance(getattr(model, "lora_configs", None), dict):
        model.lora_configs = {}
    model.lora_configs[adapter_name] = config
    log.info("injected LoRA adapter %r into %d modules", adapter_name, len(adapted))
    return model


def _adapter_params(layer: LoraLayer, name: str) -> list[nn.Parameter]:
    if isinstance(layer, LoraLinear):
        return [layer.lora_A[name].weight, layer.lora_B[name].weight] + (
            [layer.lora_magnitude_vector[name]] if layer.is_dora(name) else [])
    return [layer.lora_embedding_A[name], layer.lora_embedding_B[name]]


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, module in model.named_modules():
        if isinstance(module, LoraLayer):
            names.update(dict.fromkeys(module.adapter_names))
        elif isinstance(module, ModulesToSave):
            names.update(dict.fromkeys(module.modules_to_save))
    return list(names)


def _check_names(model: nn.Module, names) -> None:
    known = adapter_names(model)
    unknown = [n for n in dict.fromkeys(names) if n is not None and n not in known]
    if unknown:
        raise AdapterError(f"unknown adapter(s) {unknown}; this model has {known}")


def set_adapter(model: nn.Module, name: str | Sequence[str] | None) -> None:
    """Make `name` the active adapter of every LoRA layer (None: the bare base model); a list
    activates several, whose updates add (PEFT's `set_adapter([...])`)."""
    names = [name] if name is None or isinstance(name, str) else list(name)
    _check_names(model, names)
    several = not (name is None or isinstance(name, str))
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.active_adapter = names if several else name
        elif isinstance(module, ModulesToSave):
            own = [n for n in names if n in module.modules_to_save]
            if len(own) > 1:   # two trained copies of one module cannot both run (PEFT too)
                raise AdapterError(f"adapters {own} each keep their own copy of a module "
                                   "(modules_to_save); they cannot be active together")
            module.active_adapter = own[0] if own else (None if several else name)


@contextlib.contextmanager
def row_adapters(model: nn.Module, names: Sequence[str | None]):
    """Inside this block every LoRA layer of `model` uses adapter `names[i]` for row i of its
    input (None = bare base): per-row adapters for models that call `module(x)`, e.g. HF ones."""
    names = list(names)
    _check_names(model, names)
    layers = [m for m in model.modules() if isinstance(m, (LoraLayer, ModulesToSave))]
    for layer in layers:
        layer.row_adapters = names
    try:
        yield model
    finally:
        for layer in layers:
            layer.row_adapters = None


# -- parameter counts ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def percentage(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.percentage:.4f}")


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable / total parameters (shared tensors counted once; works on the meta device)."""
    params = {id(p): p for p in model.parameters()}.values()
    return ParameterCount(sum(p.numel() for p in params if p.requires_grad),
                          sum(p.numel() for p in params))


def count_lora_parameters(model: nn.Module, config: LoraConfig) -> ParameterCount:
    """What `inject_lora(model, config)` would train, from module shapes alone (nothing is
    allocated or changed): r * (in + out) per adapted matrix (LoRA sec. 4)."""
    trainable = 0
    for target in find_targets(model, config):
        module = target.module.base_layer if isinstance(target.module, LoraLayer) else target.module
        if isinstance(module, nn.Embedding):
            trainable += target.r * (module.num_embeddings + module.embedding_dim)
        else:
            features = linear_features(module)
            if features is None:
                raise TargetError(f"{target.name}: {type(module).__name__} cannot take LoRA")
            trainable += target.r * sum(features)
    base = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return ParameterCount(trainable, base + trainable)
