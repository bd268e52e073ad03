"""LoRA: low-rank layers, their injection into any nn.Module, merging (see docs/adapters.md)."""
from lorafleet.lora.config import LoraConfig
from lorafleet.lora.inject import (ParameterCount, adapter_names, count_lora_parameters,
                                   count_parameters, find_targets, inject_lora, lora_layers,
                                   row_adapters, set_adapter)
from lorafleet.lora.layers import (LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave,
                                   delta_weight, lora_delta, lora_embedding_delta)
from lorafleet.lora.merge import merge, merge_checkpoint, unload, unmerge
from lorafleet.lora.combine import combine_adapters, combine_folders
from lorafleet.lora.ops import add_weighted_adapter, delete_adapter, disable_adapter

__all__ = [
    "LoraConfig", "ParameterCount", "adapter_names", "count_lora_parameters", "count_parameters",
    "find_targets", "inject_lora", "lora_layers", "row_adapters", "set_adapter", "LoraEmbedding",
    "LoraLayer", "LoraLinear", "ModulesToSave", "delta_weight", "lora_delta",
    "lora_embedding_delta", "merge", "merge_checkpoint", "unload", "unmerge",
    "combine_adapters", "combine_folders", "add_weighted_adapter", "delete_adapter",
    "disable_adapter",
]
