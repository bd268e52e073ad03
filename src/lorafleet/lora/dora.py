"""DoRA (weight-decomposed LoRA, Liu et al., arXiv 2402.09353) as PEFT defines it (`use_dora`).

    W' = m * (W0 + s B A) / ||W0 + s B A||_row

The norm is taken per output row over the inputs and treated as a constant in training (DoRA
sec. 4.3: detached from the graph), so only A, B and the magnitude `m` [out] learn. `m` starts at
`||W0 + s B A||_row`, so the adapted layer equals the base at step 0 (B = 0). In a forward:

    h = W0 x + b + (g - 1) * (W0 x) + g * s * B A x,     g = m / ||W0 + s B A||_row

i.e. the rescale `g` multiplies the base output (without its bias) as well as the low-rank one.
PEFT saves `m` as `<module>.lora_magnitude_vector` ([out]) next to lora_A / lora_B.

Plain functions of tensors: the layer (layers.py), the merge of a checkpoint folder (merge.py) and
the tests all use these.
"""
from __future__ import annotations

import torch


def weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W0 + delta|| per output row: weight, delta [out, in] -> [out] (PEFT's `get_weight_norm`),
    detached (DoRA sec. 4.3)."""
    return torch.linalg.norm(weight + delta, dim=1).to(weight.dtype).detach()


def dora_factor(magnitude: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """g = m / ||W0 + delta||_row: [out]."""
    return magnitude / weight_norm(weight, delta)


def dora_update(base_out: torch.Tensor, lora_out: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """What DoRA adds to the base layer's output: (g - 1) * W0 x + g * s B A x.
    base_out: W0 x without the bias [..., out]; lora_out: s B A x [..., out]; factor: g [out]."""
    return (factor - 1) * base_out + factor * lora_out


def merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(W' = g * (W0 + delta) [out, in], the norm used) in float32: the merge of DoRA. Keep the
    norm: unmerging needs the norm of the unmerged weight, which the merged one no longer gives."""
    weight, delta = weight.float(), delta.float()
    norm = weight_norm(weight, delta)
    return (magnitude.float() / norm).unsqueeze(1) * (weight + delta), norm


def unmerged_weight(merged: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
                    norm: torch.Tensor) -> torch.Tensor:
    """W0 = W' / g - delta (PEFT's DoRA unmerge), float32."""
    return merged.float() / (magnitude.float() / norm.float()).unsqueeze(1) - delta.float()
