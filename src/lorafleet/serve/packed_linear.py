"""Base projections with prepacked weights for bf16 serving on CPU.

`F.linear` on a bf16 CPU tensor hands the weight to oneDNN in PyTorch's plain row-major layout,
and oneDNN reorders it into its blocked layout on every call: at decode batch sizes (1-32 rows)
that reorder costs about as much as the multiplication (hidden 1024, 17 rows, one thread:
1024x2816 127 -> 91 us, 2816x1024 333 -> 220 us, an 8192-row lm_head 1023 -> 670 us, measured
with the serve benchmark's shapes). `PackedLinear` reorders once, when the engine starts, and
calls oneDNN's linear on the packed weight (the op PyTorch's own CPU inference compiler uses for
frozen weights). The results are bit-identical to `F.linear` (tested).

Cost: by default the packed copy is held beside the original weight (which merges, saving and
the tied embedding still use), so the projection weights take twice the memory. An in-place
change of the weight (merge-and-swap, a merged adapter) is noticed through the tensor's version
counter and the weight is packed again. When the memory budget has no room for both
(memory.py), `keep_weight=False` releases the plain weight: the packed copy is the same size
and bit-exact, `dense_weight()` / `unpack()` give the plain layout back for a fallback (to
merge into, to save), and reading `.weight` raises instead of handing out a copy that in-place
changes would silently miss. A tied weight (the output head sharing the embedding) is never
released: the embedding still reads it. `prepack_weights=False` in the runner turns packing off.
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
    """y = x W^T + b with W held in oneDNN's packed layout. Frozen (serving only).
    keep_weight=False: the plain weight is released after packing (see the module docstring)."""

    def __init__(self, linear: nn.Linear, keep_weight: bool = True):
        super().__init__()
        self.keep_weight = keep_weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if keep_weight:
            self.weight = linear.weight                      # shared, not copied
            self._pack()
        else:
            self._pack(linear.weight)

    def _pack(self, weight: torch.Tensor | None = None) -> None:
        weight = self.weight if weight is None else weight
        with torch.no_grad():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)
        self._packed_version = weight._version

    def __getattr__(self, name: str):
        if name == "weight" and not self.__dict__.get("keep_weight", True):
            raise AttributeError(
                "PackedLinear.weight was released after prepacking (the memory budget had no "
                "room for both copies); use dense_weight() to read it or unpack() for a plain "
                "nn.Linear to change it")
        return super().__getattr__(name)

    def dense_weight(self) -> torch.Tensor:
        """The weight [out, in] in the plain layout (a copy when it was released; bit-exact)."""
        return self.weight if self.keep_weight else self._packed.to_dense()

    def unpack(self) -> nn.Linear:
        """A plain nn.Linear with this weight and bias: the fallback path (merging, saving)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        linear.weight = (self.weight if self.keep_weight
                         else nn.Parameter(self.dense_weight(), requires_grad=False))
        linear.bias = self.bias
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep_weight and self.weight._version != self._packed_version:    # merged into
            self._pack()
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")


def is_tied(linear: nn.Module, model: nn.Module) -> bool:
    """Whether the module's weight is also another module's (an output head tied to the
    embedding): releasing it would free nothing."""
    weight = linear.weight
    return any(p is weight and m is not linear
               for m in model.modules() for p in m.parameters(recurse=False))


def prepack_projections(shells: list[nn.Module], keep_weights: bool = True,
                        model: nn.Module | None = None) -> int:
    """Swap the base layer of each BatchedLoraLinear shell for a PackedLinear where possible.
    keep_weights=False: release the plain weights (memory.py); a tied weight (`model` given)
    is then left unpacked, since its plain copy stays for the embedding anyway. Returns how
    many were packed."""
    packed = 0
    for shell in shells:
        base = shell.base_layer
        if not can_prepack(base):
            continue
        if not keep_weights and model is not None and is_tied(base, model):
            continue
        shell.base_layer = PackedLinear(base, keep_weight=keep_weights)
        packed += 1
    return packed
