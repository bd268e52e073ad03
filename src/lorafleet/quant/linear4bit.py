"""A frozen 4-bit linear layer (QLoRA's base), and a 4-bit embedding table.

`Linear4bit` keeps only the NF4 storage (codes + scales, as buffers so they follow `.to(device)`
and land in `state_dict()`); every forward decodes the weight chunk by chunk straight into the
input's dtype and multiplies (`linear_nf4`). Nothing dequantized is cached or saved for
backward (memory is the point): the backward dequantizes again, as bitsandbytes' `MatMul4Bit`
does.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.errors import ConfigError
from lorafleet.models.modules import is_conv1d

from .kernel import nf4_kernel_linear
from .nf4 import (DOUBLE_QUANT_BLOCK, NF4Tensor, _byte_pair_table, _check_block_size, decode_nf4,
                  dequantize_nf4, dequantize_nf4_reference, quantize_nf4, requantize_nf4)

log = logging.getLogger(__name__)

_STORAGE = ("codes", "absmax", "absmax_codes", "absmax_scale", "absmax_offset")


# Rows of W dequantized per step of `linear_nf4`: ~2 MB of weights, small enough to stay in
# cache between the decode and the matmul (best of 64..1024 rows of a 4096-wide bf16 matrix on
# the 2-core EPYC dev box: 256-512 rows), and small enough that the buffers are reused instead
# of fresh pages being faulted in for a whole-matrix temporary on every call.
CHUNK_BYTES = 2 << 20
# Up to this many tokens (decode), `linear_nf4` applies the block scales after the matmul, to
# per-block partial sums (tokens * out * in / 64 multiplies) instead of to the decoded weight
# (out * in): the bf16 scale multiply was the largest single cost of a 1-token forward. Past ~32
# tokens the partial sums outnumber a quarter of the weight and the plain path wins again.
FEW_TOKENS = 16
# Rows per step of the few-token path: 4 MB of decoded bf16 weight (512 rows of 4096) measured
# best of 128..1024 rows on the dev box; larger tiles give the per-block batched matmul longer
# rows to stream.
FEW_TOKENS_CHUNK_BYTES = 4 << 20


def linear_nf4(x: torch.Tensor, nf4: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b with W [out, in] in NF4: x [..., in] -> y [..., out] in x's dtype.

    W is decoded a chunk of rows at a time into one reused buffer and each chunk's matmul runs
    while it is still in cache; the full dequantized matrix never exists."""
    out_features, in_features = nf4.shape
    dtype = x.dtype
    x2d = x.reshape(-1, in_features)
    y = nf4_kernel_linear(x2d, nf4)  # decode (few tokens) with the fused C kernel, if built
    if y is not None:
        if bias is not None:
            y += bias.float()
        return y.to(dtype).view(*x.shape[:-1], out_features)
    rows = max(1, CHUNK_BYTES // (in_features * dtype.itemsize))
    if in_features % nf4.block_size or rows >= out_features:  # ragged rows / small layer
        return F.linear(x, dequantize_nf4(nf4, dtype), None if bias is None else bias.to(dtype))
    # not fp16: the unscaled partial sums are ~1/absmax (~20x) larger than the output and could
    # overflow its range on outlier activations; bf16 and fp32 have fp32's range
    if x2d.shape[0] <= FEW_TOKENS and dtype in (torch.bfloat16, torch.float32):
        y = _linear_nf4_few_tokens(x2d, nf4)
        if bias is not None:
            y += bias.to(dtype)
        return y.view(*x.shape[:-1], out_features)
    y_t = torch.empty(out_features, x2d.shape[0], dtype=dtype, device=x.device)  # [out, tokens]
    codes = nf4.codes[: out_features * in_features // 2].view(out_features, -1)
    scales = nf4.scales().to(dtype).view(out_features, -1)
    per_index = 4 if dtype.itemsize == 2 else 2  # values one table entry holds
    buffer = torch.empty(rows * in_features // per_index, dtype=torch.int64, device=x.device)
    for start in range(0, out_features, rows):
        n = min(rows, out_features - start)
        w = decode_nf4(codes[start:start + n].reshape(-1), scales[start:start + n].reshape(-1),
                       nf4.block_size, dtype, out=buffer[: n * in_features // per_index])
        torch.mm(w.view(n, in_features), x2d.t(), out=y_t[start:start + n])
    if bias is not None:
        y_t += bias.to(dtype).unsqueeze(1)
    return y_t.t().contiguous().view(*x.shape[:-1], out_features)


def _linear_nf4_few_tokens(x2d: torch.Tensor, nf4: NF4Tensor) -> torch.Tensor:
    """x [T, in] @ W^T for few tokens T, scaling after the matmul:

        y[t, o] = sum_b s[o, b] * z[b, o, t],   z[b, o, t] = sum_k cb[code[o, b, k]] * x[t, b, k]

    z is one batched matmul per chunk of rows (batch = block b) over the UNSCALED decoded codes,
    so the 64x-smaller scale multiply runs on z (in fp32) instead of on the weight. Each block's
    partial sum z is rounded to x's dtype once (bf16: rel. 2^-9, the same size as the rounding
    of the output itself)."""
    out_features, in_features = nf4.shape
    tokens, dtype, block = x2d.shape[0], x2d.dtype, nf4.block_size
    n_blocks = in_features // block
    per_index = 4 if dtype.itemsize == 2 else 2  # values one table entry holds
    table = _byte_pair_table(dtype, x2d.device)
    # codes of row o, block b as table indices: [out, n_blocks, block / per_index]
    words = nf4.codes[: out_features * in_features // 2]
    words = (words.view(torch.uint16) if per_index == 4 else words).view(out_features, n_blocks, -1)
    scales = nf4.scales().view(out_features, n_blocks)  # fp32
    x_blocks = x2d.view(tokens, n_blocks, block).permute(1, 2, 0).contiguous()  # [nb, block, T]
    rows = max(1, min(out_features, FEW_TOKENS_CHUNK_BYTES // (in_features * dtype.itemsize)))
    # flat buffers, reused by every chunk (a shorter last chunk views a prefix of each)
    index = torch.empty(n_blocks * rows * block // per_index, dtype=torch.int32, device=x2d.device)
    decoded = torch.empty(index.numel(), dtype=torch.int64, device=x2d.device)
    partial = torch.empty(n_blocks * rows * tokens, dtype=dtype, device=x2d.device)
    y = torch.empty(out_features, 1, tokens, dtype=torch.float32, device=x2d.device)
    for start in range(0, out_features, rows):
        n = min(rows, out_features - start)
        # block-major copy of the indices (the int32 conversion copies anyway), so each block's
        # tile [n, block] is contiguous for the batched matmul
        idx = index[: n_blocks * n * block // per_index]
        idx.view(n_blocks, n, -1).copy_(words[start:start + n].transpose(0, 1))
        w = torch.index_select(table, 0, idx, out=decoded[: idx.numel()])
        z = torch.bmm(w.view(dtype).view(n_blocks, n, block), x_blocks,
                      out=partial[: n_blocks * n * tokens].view(n_blocks, n, tokens))
        torch.bmm(scales[start:start + n].unsqueeze(1), z.permute(1, 0, 2).float(),
                  out=y[start:start + n])
    return y.view(out_features, tokens).t().to(dtype)


def linear_nf4_reference(x: torch.Tensor, nf4: NF4Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """The slow twin: dequantize the whole matrix in fp32 (bnb's math), cast, F.linear."""
    return F.linear(x, dequantize_nf4_reference(nf4, x.dtype),
                    None if bias is None else bias.to(x.dtype))


class _DequantLinear(torch.autograd.Function):
    """y = x @ W^T + b with W dequantized on the fly in the forward AND again in the backward:
    nothing dequantized is saved between them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, nf4: NF4Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.nf4 = nf4
        return linear_nf4(x, nf4, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # W is frozen; the bias may train (BitFit), so it gets a gradient when it asks for one.
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_nf4(ctx.nf4, grad_out.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_bias


def _storage_shapes(numel: int, block_size: int, double_quant: bool) -> dict[str, tuple]:
    n_blocks = math.ceil(numel / block_size)
    shapes = {"codes": (n_blocks * block_size // 2,)}
    if double_quant:
        shapes.update(absmax_codes=(n_blocks,),
                      absmax_scale=(math.ceil(n_blocks / DOUBLE_QUANT_BLOCK),), absmax_offset=())
    else:
        shapes["absmax"] = (n_blocks,)
    return shapes


class Linear4bit(nn.Module):
    """Frozen `y = x W^T + b` with W `[out, in]` stored in NF4.

    Built empty (e.g. on the meta device) and filled by `set_weight`, `from_module`, or loading a
    state dict that holds either our NF4 buffers or a plain float `weight` (quantized on load).
    `fan_in_fan_out=True` marks a layer that replaced a GPT-2 Conv1D: a float `weight` loaded into
    it is `[in, out]` and is transposed first.
    """

    # A projection to models.modules.is_projection (LoRA's all-linear, the serving runner's
    # shells), which cannot import this class: models sits left of quant.
    linear_projection = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 block_size: int = 64, double_quant: bool = True, fan_in_fan_out: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        _check_block_size(block_size)
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.double_quant = block_size, double_quant
        self.fan_in_fan_out = fan_in_fan_out
        self.dtype = dtype  # the dtype `weight` and a float state dict come back in
        dtypes = {"codes": torch.uint8, "absmax_codes": torch.uint8}
        for name, shape in _storage_shapes(in_features * out_features, block_size,
                                           double_quant).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtypes.get(name, torch.float32),
                                                   device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                  requires_grad=False) if bias else None)

    @classmethod
    def from_module(cls, module: nn.Module, block_size: int = 64, double_quant: bool = True
                    ) -> Linear4bit:
        """Quantize an `nn.Linear` (weight [out, in]) or a Conv1D (weight [in, out])."""
        conv1d = is_conv1d(module)
        weight = module.weight.t() if conv1d else module.weight
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=module.bias is not None,
                    block_size=block_size, double_quant=double_quant, fan_in_fan_out=conv1d,
                    device=weight.device, dtype=weight.dtype)
        if weight.is_meta:
            return layer  # storage is filled when the weights are loaded
        layer.set_weight(weight)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        return layer

    @property
    def nf4(self) -> NF4Tensor:
        """The stored weight as an NF4Tensor (sharing this module's buffers)."""
        return NF4Tensor(shape=torch.Size((self.out_features, self.in_features)), dtype=self.dtype,
                         block_size=self.block_size,
                         **{n: getattr(self, n) for n in _STORAGE if n in self._buffers})

    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize `weight` [out, in] into this layer's storage (replacing it)."""
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise ConfigError(f"Linear4bit.set_weight: expected weight of shape {list(expected)}, "
                              f"got {list(weight.shape)}")
        self.set_nf4(quantize_nf4(weight, self.block_size, self.double_quant))

    def set_nf4(self, nf4: NF4Tensor) -> None:
        """Make an already quantized weight [out, in] this layer's storage (a requantized merge,
        LoftQ's Q)."""
        for name, tensor in nf4.stored_tensors().items():
            self._buffers[name] = tensor

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [out, in] in `self.dtype` (a fresh tensor on every access)."""
        return dequantize_nf4(self.nf4, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out], computed in x's dtype."""
        return _DequantLinear.apply(x, self.nf4, self.bias)

    def merge_delta(self, delta: torch.Tensor) -> float:
        """W <- requantize(dequantize(W) + delta), delta [out, in] (a LoRA merge into a 4-bit base).

        This rounds: the stored weight becomes the nearest NF4 point to W + delta on the layer's
        grid (block scales kept unless a block outgrows its scale), and a later unmerge rounds
        again. Returns the RMS of that rounding error.
        """
        if tuple(delta.shape) != (self.out_features, self.in_features):
            raise ConfigError(f"merge_delta: delta shape {list(delta.shape)} != weight shape "
                              f"{[self.out_features, self.in_features]}")
        with torch.no_grad():
            target = dequantize_nf4(self.nf4, torch.float32) + delta.float()
            self.set_nf4(requantize_nf4(self.nf4, target))
            rms = (dequantize_nf4(self.nf4, torch.float32) - target).pow(2).mean().sqrt().item()
        log.warning("merging into a 4-bit NF4 base requantizes the weight: the result is rounded "
                    "to NF4 (RMS error %.3g); export a merged bf16/fp16 checkpoint (lorafleet "
                    "merge) for an exact merge", rms)
        return rms

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` must change the compute dtype, never the stored codes and
        # fp32 scales: move the storage to the new device only.
        storage = {n: self._buffers.pop(n) for n in _STORAGE if n in self._buffers}
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.dtype, device=storage["codes"].device))
        self.dtype = probe.dtype
        for name, tensor in storage.items():
            # meta storage (model.to_empty) can only be re-created, not copied
            moved = fn(tensor).to(tensor.dtype) if tensor.is_meta else tensor.to(probe.device)
            self._buffers[name] = moved
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "weight"
        if key in state_dict:  # a float checkpoint: quantize on load
            weight = state_dict[key]
            self.set_weight(weight.t() if self.fan_in_fan_out else weight)
            state_dict = {k: v for k, v in state_dict.items() if k != key}
            state_dict.update({prefix + n: t for n, t in self._buffers.items() if n in _STORAGE})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block_size={self.block_size}, "
                f"double_quant={self.double_quant}")


class Embedding4bit(nn.Module):
    """A frozen embedding table [vocab, dim] in NF4; a lookup dequantizes only the rows it reads
    (when dim is a multiple of the block size, each row is whole blocks)."""

    def __init__(self, embedding: nn.Embedding, block_size: int = 64, double_quant: bool = True):
        super().__init__()
        if embedding.embedding_dim % block_size:
            raise ConfigError(f"Embedding4bit: embedding_dim {embedding.embedding_dim} must be a "
                              f"multiple of block_size {block_size}")
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.block_size, self.dtype = block_size, embedding.weight.dtype
        self.padding_idx = embedding.padding_idx
        nf4 = quantize_nf4(embedding.weight, block_size, double_quant)
        self.codes = nn.Buffer(nf4.codes.view(self.num_embeddings, -1))
        # Row scales are decoded once: [vocab, dim / block_size] fp32 (double quantization saves
        # little on a table that is already read row by row).
        self.row_scales = nn.Buffer(nf4.scales().view(self.num_embeddings, -1))

    @property
    def weight(self) -> torch.Tensor:
        return self._rows(torch.arange(self.num_embeddings, device=self.codes.device))

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        rows = NF4Tensor(codes=self.codes[ids].reshape(-1), absmax=self.row_scales[ids].reshape(-1),
                         shape=torch.Size((ids.numel(), self.embedding_dim)), dtype=self.dtype,
                         block_size=self.block_size)
        return dequantize_nf4(rows, self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._rows(ids.reshape(-1)).view(*ids.shape, self.embedding_dim)
