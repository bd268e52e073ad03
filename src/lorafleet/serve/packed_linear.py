"""Base projections with prepacked weights for bf16 serving on CPU.

`F.linear` on a bf16 CPU tensor hands the weight to oneDNN in PyTorch's plain row-major layout,
and oneDNN reorders it into its blocked layout on every call: at decode batch sizes (1-32 rows)
that reorder costs about as much as the multiplication (hidden 1024, 17 rows, one thread:
1024x2816 127 -> 91 us, 2816x1024 333 -> 220 us, an 8192-row lm_head 1023 -> 670 us, measured
with the serve benchmark's shapes). `PackedLinear` reorders once, when the engine starts, and
calls oneDNN's linear on the packed weight (the op PyTorch's own CPU inference compiler uses for
frozen weights). The results are bit-identical to `F.linear` (tested).

Cost: the packed copy is held beside the original weight (which merges, saving and the tied
embedding still use), so the projection weights take twice the memory; `prepack_weights=False`
in the runner turns it off. An in-place change of the weight (merge-and-swap, a merged adapter)
is noticed through the tensor's version counter and the weight is packed again.
"""
from __future__ import annotations

import torch
from torch import nn

BATCH_HINT = 32          # oneDNN picks the packed layout for about this many rows


def can_prepack(linear: nn.Module) -> bool:
    """A plain bf16 nn.Linear on CPU, where this torch build has oneDNN with bf16 support."""
    return (type(linear) is nn.Linear and linear.weight.device.type == "cpu"
            and linear.weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's packed layout. Frozen (serving only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias     # shared, not copied
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._pack()

    def _pack(self) -> None:
        with torch.no_grad():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(),
                                                                   BATCH_HINT)
        self._packed_version = self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight._version != self._packed_version:     # merged into since packing
            self._pack()
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")


def prepack_projections(shells: list[nn.Module]) -> int:
    """Swap the base layer of each BatchedLoraLinear shell for a PackedLinear where possible.
    Returns how many were packed."""
    packed = 0
    for shell in shells:
        if can_prepack(shell.base_layer):
            shell.base_layer = PackedLinear(shell.base_layer)
            packed += 1
    return packed
