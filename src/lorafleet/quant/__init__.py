"""QLoRA's frozen base: NF4 with double quantization and a 4-bit linear layer LoRA can wrap."""
from .linear4bit import Embedding4bit, Linear4bit
from .model import MemoryReport, load_quantized_model, memory_report, quantize_model
from .nf4 import (NF4_CODEBOOK, NF4Tensor, dequantize_nf4, dequantize_nf4_reference,
                  quantize_nf4, requantize_nf4)

__all__ = [
    "NF4_CODEBOOK", "NF4Tensor", "quantize_nf4", "requantize_nf4", "dequantize_nf4", "dequantize_nf4_reference",
    "Linear4bit", "Embedding4bit", "quantize_model", "load_quantized_model", "memory_report",
    "MemoryReport",
]
