"""LoRA: low-rank layers, their injection into any nn.Module, merging (see docs/adapters.md)."""
from lorafleet.lora.config import LoraConfig
from lorafleet.lora.inject import (ParameterCount, adapter_names, count_lora_parameters,
                                   count_parameters, find_targets, inject_lora, lora_layers,
                                   row_adapters, set_adapter)
from lorafleet.lora.layers import (LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave,
                                   delta_weight, lora_delta, lora_embedding_delta)
from lorafleet.lora.merge import merge, merge_checkpoint, unload, unmerge

__all__ = [
    "LoraConfig", "ParameterCount", "adapter_names", "count_lora_parameters", "count_parameters",
    "find_targets", "inject_lora", "lora_layers", "row_adapters", "set_adapter", "LoraEmbedding",
    "LoraLayer", "LoraLinear", "ModulesToSave", "delta_weight", "lora_delta",
    "lora_embedding_delta", "merge", "merge_checkpoint", "unload", "unmerge",
]
