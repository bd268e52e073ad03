"""Quantizing a whole model: the module swap, loading a checkpoint straight into 4-bit, and the
memory account of what is stored.

STYLE.md rule 16 (gpt-fast's pattern): build the model on the meta device, swap its linears for
empty `Linear4bit`s, then stream the checkpoint in one tensor at a time, quantizing each linear
weight as it arrives, so the full-precision model never exists in memory.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorafleet.errors import ConfigError
from lorafleet.models.modules import OUTPUT_HEAD, is_conv1d, name_matches

from .linear4bit import Embedding4bit, Linear4bit
from .nf4 import _check_block_size

if TYPE_CHECKING:
    from lorafleet.models.loader import Progress

log = logging.getLogger(__name__)


def quantize_model(model: nn.Module, skip: tuple[str, ...] = (OUTPUT_HEAD,),
                   include_embeddings: bool = False, block_size: int = 64,
                   double_quant: bool = True) -> nn.Module:
    """Swap every nn.Linear and Conv1D of `model` (in place) for a frozen `Linear4bit`.

    skip: module names (full, or a last component such as "lm_head") kept in full precision. The
    output head is kept unless the caller takes "lm_head" out of `skip`; embeddings are quantized
    only with `include_embeddings=True`. A LoRA layer (anything with a `base_layer`) has only its
    base quantized, never its adapters. Works on meta-device models: the storage is then filled
    when weights are loaded (see `load_quantized_model`).
    """
    _check_block_size(block_size)

    def quantized(child: nn.Module) -> nn.Module | None:
        if isinstance(child, nn.Linear) or is_conv1d(child):
            return Linear4bit.from_module(child, block_size, double_quant)
        if include_embeddings and isinstance(child, nn.Embedding):
            return Embedding4bit(child, block_size, double_quant)
        return None

    swapped: list[str] = []

    def swap(module: nn.Module, prefix: str) -> None:
        for child_name, child in list(module.named_children()):
            name = prefix + child_name
            if name_matches(name, skip):
                continue
            base = getattr(child, "base_layer", None)
            new = quantized(child) if base is None else None
            if new is not None:
                setattr(module, child_name, new)
                swapped.append(name)
            elif isinstance(base, nn.Module) and not name_matches(name + ".base_layer", skip):
                new_base = quantized(base)
                if new_base is not None:
                    child.base_layer = new_base
                    swapped.append(name + ".base_layer")
            else:
                swap(child, name + ".")

    swap(model, "")
    if not swapped:
        raise ConfigError(f"quantize_model: the model has no nn.Linear / Conv1D to quantize "
                          f"(skip={skip!r})")
    log.info("quantized %d modules to NF4 (block %d, double_quant=%s)", len(swapped),
             block_size, double_quant)
    return model


def load_quantized_model(path: str | Path, dtype: str | torch.dtype = torch.bfloat16,
                         device: str | torch.device = "cpu", skip: tuple[str, ...] = (OUTPUT_HEAD,),
                         block_size: int = 64, double_quant: bool = True,
                         progress: Progress | None = None) -> nn.Module:
    """Load a Hugging Face checkpoint folder with its linears in NF4, never materializing the
    full-precision model: each linear weight is quantized as it is read. The non-quantized
    parameters (embeddings, norms, skipped layers) are loaded in `dtype`; 4-bit layers compute in
    the input's dtype. `progress(done, total)`: called per tensor read and quantized."""
    from lorafleet.models.config import ModelConfig
    from lorafleet.models.loader import build_model, checkpoint_tensors, resolve_dtype

    path = Path(path)
    config = ModelConfig.from_hf(path)
    dtype = resolve_dtype(dtype, path, device)
    if config.tie_word_embeddings and not name_matches(OUTPUT_HEAD, skip):
        log.warning("lm_head shares the embedding matrix: keeping it in %s", dtype)
        skip = (*skip, OUTPUT_HEAD)
    model = build_model(config)  # meta device
    # The checkpoint is validated against an unswapped twin (meta: free), whose keys are HF's.
    # Read in float32 and cast here: NF4 codes come from the checkpoint's own values (the same
    # codes as quantizing a float32-loaded model), never from a bf16 rounding of them; one
    # float32 tensor at a time is the only high-precision copy that ever exists.
    tensors = checkpoint_tensors(path, build_model(config), torch.float32, device, progress)
    quantize_model(model, skip=skip, block_size=block_size, double_quant=double_quant)
    modules = dict(model.named_modules())
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in tensors:
        owner, _, leaf = key.rpartition(".")
        layer = modules.get(owner)
        if isinstance(layer, Linear4bit) and leaf == "weight":
            layer._buffers.update(_fresh_storage(layer, tensor))
            layer.dtype = dtype
        else:
            tensor = tensor.to(dtype) if tensor.is_floating_point() else tensor
            if isinstance(layer, Linear4bit) and leaf == "bias":
                layer.bias = nn.Parameter(tensor, requires_grad=False)
            else:
                rest[key] = tensor
        del tensor  # drop the float32 copy before the next one is read
        _return_freed_memory()
    model.load_state_dict(rest, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if t.is_meta]
    if leftover:
        raise ConfigError(f"{path}: not loaded after quantization: {', '.join(leftover[:5])}")
    model.name_or_path = str(path.resolve())  # as load_model: adapters trained over it name it
    return model.eval()


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


def _return_freed_memory() -> None:
    """Hand the freed float32 tensor and quantization temporaries back to the OS. glibc's
    malloc raises its mmap threshold after the first large free, so later tensors of that size
    come from the heap, where the small NF4 results between them fragment it and the freed
    space stays in RSS: measured on a 4-layer, 1024-wide Llama, loading held 127 MB instead of
    the 35 MB stored. malloc_trim releases every free page of the heap (a few ms)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _fresh_storage(layer: Linear4bit, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    from .nf4 import quantize_nf4

    weight = weight.t() if layer.fan_in_fan_out else weight
    return quantize_nf4(weight, layer.block_size, layer.double_quant).stored_tensors()


@dataclass
class MemoryReport:
    """What a (partly) quantized model stores. `quantized_*` cover the NF4 layers only."""

    quantized_params: int       # parameters held in NF4
    quantized_bytes: int        # their codes + scales, as stored
    other_params: int           # everything else (embeddings, norms, head, adapters)
    other_bytes: int

    @property
    def bits_per_quantized_param(self) -> float:
        return 8 * self.quantized_bytes / max(self.quantized_params, 1)

    @property
    def bytes_per_quantized_param(self) -> float:
        return self.quantized_bytes / max(self.quantized_params, 1)

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.other_bytes


def memory_report(model: nn.Module) -> MemoryReport:
    """Count the bytes actually stored: NF4 layers by their buffers, the rest by their tensors
    (each shared tensor once)."""
    q_params = q_bytes = o_params = o_bytes = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, Linear4bit):
            nf4 = module.nf4
            q_params += nf4.numel
            q_bytes += nf4.nbytes
            tensors = [module.bias] if module.bias is not None else []
        elif isinstance(module, Embedding4bit):
            q_params += module.num_embeddings * module.embedding_dim
            q_bytes += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
            tensors = []
        else:
            tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        for tensor in tensors:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            o_params += tensor.numel() if tensor.is_floating_point() else 0
            o_bytes += tensor.numel() * tensor.element_size()
    return MemoryReport(q_params, q_bytes, o_params, o_bytes)
