"""The LoRA linear layer as one autograd node: base + s * B(A(dropout(x))) for training speed.

The plain path (`LoraLayer.forward`: base, then `lora_delta`, then an add) is the reference and
stays; this one computes the same numbers with fewer passes over the [tokens, out] and
[tokens, in] activations, which is where a LoRA step spends its time beyond the matmuls both
paths share:

  forward    out = x W^T + b;  xa = x_d A^T  [N, r];  out += s * xa B^T   (addmm in place: no
             separate delta, scaled delta or sum tensors)
  backward   g_xa = s * g B  [N, r];  dB = s * g^T xa;  dA = g_xa^T x_d;
             dx = g W + g_xa A   (one [N, in] buffer, the low-rank part added in place)
             and no dW: the frozen base needs only its input gradient (an eligible base has
             `requires_grad=False`).

Saved for backward: x (or x_d under dropout), the small xa, and references to W, A, B.
`FUSED` = False switches every layer back to the reference path (tests hold them equal).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FUSED = True  # module switch: False -> the plain reference path everywhere


class LoraLinearFunction(torch.autograd.Function):
    """x: [..., in]; weight: [out, in] frozen; bias: [out] or None; A: [r, in]; B: [out, r];
    x_lora: dropout(x), or None when the adapter has no dropout (then x feeds A too)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling: float, x_lora):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, shape[-1])
        out = F.linear(x2, weight, bias)                 # [N, out]
        xa = torch.mm(xl2, A.t())                        # [N, r]
        out.addmm_(xa, B.t(), alpha=scaling)
        ctx.scaling, ctx.dropped = scaling, x_lora is not None
        ctx.save_for_backward(x2, xl2 if x_lora is not None else None, weight, A, B, xa)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, xl2, weight, A, B, xa = ctx.saved_tensors
        xl2 = x2 if xl2 is None else xl2
        s = ctx.scaling
        need_x, need_w, need_b, need_a, need_bb, _, need_xl = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])             # [N, out]
        g_xa = torch.mm(g, B).mul_(s)                    # [N, r]
        dA = torch.mm(g_xa.t(), xl2) if need_a else None
        dB = torch.mm(g.t(), xa).mul_(s) if need_bb else None
        dx = dxl = None
        if need_x:
            dx = torch.mm(g, weight)                     # the frozen base: input gradient only
            if not ctx.dropped:
                dx.addmm_(g_xa, A)
        if ctx.dropped and need_xl:
            dxl = torch.mm(g_xa, A).view(*grad.shape[:-1], A.shape[1])
        if dx is not None:
            dx = dx.view(*grad.shape[:-1], weight.shape[1])
        dw = torch.mm(g.t(), x2) if need_w else None
        db = g.sum(0) if need_b else None
        return dx, dw, db, dA, dB, None, dxl


def can_fuse(base: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    """A plain nn.Linear base with a frozen weight, one dtype and device throughout, no hooks
    (anything else: the reference path, which handles Conv1D, 4-bit bases and mixed dtypes)."""
    if not FUSED or type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
        return False
    # Under autocast the matmuls inside the function would be cast but its in-place addmm_ not
    # (mixed dtypes): the reference path lets autocast handle every op.
    if torch.is_autocast_enabled(x.device.type):
        return False
    weight = base.weight
    if weight.requires_grad or not (x.dtype == weight.dtype == A.dtype == B.dtype):
        return False
    return x.device == weight.device == A.device


def lora_linear(x: torch.Tensor, base: nn.Linear, A: torch.Tensor, B: torch.Tensor,
                scaling: float, dropout: nn.Module) -> torch.Tensor:
    """base(x) + scaling * B(A(dropout(x))) through `LoraLinearFunction` (dropout as given:
    nn.Identity, or nn.Dropout which is skipped in eval mode, so no copy of x when p = 0)."""
    x_lora = None
    if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
        x_lora = dropout(x)
    return LoraLinearFunction.apply(x, base.weight, base.bias, A, B, float(scaling), x_lora)
