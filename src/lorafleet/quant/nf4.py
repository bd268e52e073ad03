"""4-bit NormalFloat (NF4) with blockwise absmax scales and double quantization (QLoRA sec. 3).

Storage layout follows bitsandbytes' `quantize_4bit(..., quant_type="nf4")`, so codes and
scales can be compared with it one for one:

- `codes`: uint8 `[padded_numel // 2]`, two 4-bit codebook indices per byte, the first element of
  each pair in the HIGH nibble.
- scales: one absmax per block of `block_size` consecutive elements of the flattened weight.
  With double quantization (QLoRA sec. 3, "Double Quantization") the fp32 absmax values are
  shifted by their mean (`absmax_offset`) and quantized to 8 bits with bitsandbytes' signed
  dynamic map in blocks of 256 (`absmax_codes` uint8, `absmax_scale` fp32 per 256 blocks).

A weight whose size is not a multiple of `block_size` is padded with zeros to whole blocks (the
padding is recorded by `shape` and sliced off on dequantization); zeros never change a block's
absmax, so the codes of the real elements are exactly bitsandbytes' (which uses a short last block).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import lru_cache

import torch

from lorafleet.errors import ConfigError

# QLoRA appendix E / bitsandbytes `_NF4_QUANT_TABLE`: quantiles of N(0, 1) normalized to [-1, 1],
# with an exact zero.
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# QLoRA sec. 3: the second-level quantization uses blocks of 256 first-level scales.
DOUBLE_QUANT_BLOCK = 256
# bitsandbytes clamps an all-zero block's absmax to this before dividing (the stored absmax
# stays 0).
_TINY_ABSMAX = 1e-38


@lru_cache(maxsize=None)
def _codebook_cpu() -> torch.Tensor:
    return torch.tensor(NF4_CODEBOOK, dtype=torch.float32)


def nf4_codebook(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 values, fp32 `[16]`, ascending."""
    return _codebook_cpu().to(device)


@lru_cache(maxsize=None)
def _dynamic_map_cpu() -> torch.Tensor:
    # bitsandbytes `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`
    # (Dettmers 2015, "8-bit approximations"): 7 exponent ranges 1e-6..1, each holding 2**i
    # fraction steps per sign, plus 0 and 1. Same float32 arithmetic, so values match bit for bit.
    values: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        values += ((10 ** (-6 + i)) * means).tolist()
        values += (-(10 ** (-6 + i)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map, fp32 `[256]`, ascending (used for the scales)."""
    return _dynamic_map_cpu().to(device)


def _round_to_codebook(scaled: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the nearest codebook value for each element of `scaled` (in [-1, 1]).
    A value exactly on a midpoint goes to the lower code, as torch.bucketize does in bnb.

    For the 16 NF4 values, counting the midpoints below each value (15 vectorized comparisons)
    is ~5x faster on CPU than bucketize's per-element binary search; same result."""
    midpoints = (codebook[:-1] + codebook[1:]) / 2
    if midpoints.numel() > 15:
        return torch.bucketize(scaled, midpoints).to(torch.uint8)
    index = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
    for midpoint in midpoints.tolist():
        index += scaled > midpoint
    return index


def _check_block_size(block_size: int, field: str = "block_size") -> None:
    if not isinstance(block_size, int) or block_size <= 0 or block_size % 4:
        raise ConfigError(f"{field} must be a positive multiple of 4 (bitsandbytes uses 32..4096),"
                          f" got {block_size!r}")


def _blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """`flat` [n] zero-padded to whole blocks -> [n_blocks, block_size]."""
    pad = (-flat.numel()) % block_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block_size)


def quantize_blockwise(values: torch.Tensor, codebook: torch.Tensor, block_size: int,
                       absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization to the nearest codebook entry.

    values: [n] float; returns (indices uint8 [n_blocks, block_size] (padded), absmax fp32
    [n_blocks]). `absmax` given: use those scales instead of each block's own. Scaling multiplies
    by the reciprocal, clamped to [-1, 1], like bitsandbytes.
    """
    blocks = _blocks(values.reshape(-1).float(), block_size)
    if absmax is None:
        absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=_TINY_ABSMAX)).unsqueeze(1), -1, 1)
    return _round_to_codebook(scaled, codebook.to(values.device)), absmax


def pack_nibbles(indices: torch.Tensor) -> torch.Tensor:
    """uint8 indices < 16, [2k] -> [k] bytes, first of each pair in the high nibble (bnb order)."""
    pairs = indices.reshape(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: [k] bytes -> [2k] uint8 indices."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)


@dataclass
class NF4Tensor:
    """A weight stored as NF4. All tensors live on one device; `shape`/`dtype` are the original's.

    codes:         uint8 [padded_numel // 2]   packed 4-bit indices into NF4_CODEBOOK
    absmax:        fp32 [n_blocks]             (double_quant=False) the block scales
    absmax_codes:  uint8 [n_blocks]            (double_quant=True) scales minus offset, 8-bit
    absmax_scale:  fp32 [ceil(n_blocks/256)]   (double_quant=True) absmax of each 256 scales
    absmax_offset: fp32 []                     (double_quant=True) the mean of the scales
    """

    codes: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    block_size: int
    absmax: torch.Tensor | None = None
    absmax_codes: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.absmax_codes is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that are stored (what `nbytes` counts), by field name."""
        names = ("codes", "absmax", "absmax_codes", "absmax_scale", "absmax_offset")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @property
    def nbytes(self) -> int:
        """Bytes actually held by the stored tensors (codes + scales; the two codebooks are
        format constants shared by every tensor and not counted)."""
        return sum(t.numel() * t.element_size() for t in self.stored_tensors().values())

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.numel

    def scales(self) -> torch.Tensor:
        """The per-block absmax as fp32 [n_blocks] (decoding the double quantization)."""
        if not self.double_quant:
            return self.absmax.float()
        return dequantize_blockwise(self.absmax_codes, self.absmax_scale, dynamic_map(self.device),
                                    DOUBLE_QUANT_BLOCK) + self.absmax_offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self, dtype)

    def to(self, device: torch.device | str) -> NF4Tensor:
        moved = {n: t.to(device) for n, t in self.stored_tensors().items()}
        return NF4Tensor(shape=self.shape, dtype=self.dtype, block_size=self.block_size, **moved)


def dequantize_blockwise(indices: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor,
                         block_size: int) -> torch.Tensor:
    """indices uint8 [n], absmax fp32 [ceil(n / block_size)] -> fp32 [n]."""
    # index_select with int32 indices: ~3x faster than advanced indexing with int64 (this runs
    # on every Linear4bit forward to decode the double-quantized scales); same values.
    values = torch.index_select(codebook, 0, indices.reshape(-1).int())
    values = _blocks(values, block_size) * absmax.unsqueeze(1)
    return values.reshape(-1)[: indices.numel()]


def _checked(weight: torch.Tensor, what: str) -> torch.Tensor:
    if not weight.is_floating_point():
        raise ConfigError(f"{what}: weight must be a floating-point tensor, got {weight.dtype}")
    if weight.numel() == 0:
        raise ConfigError(f"{what}: weight is empty (shape {tuple(weight.shape)})")
    return weight.detach()


def _check_finite(absmax: torch.Tensor, what: str) -> None:
    # A block's absmax is inf/NaN exactly when the block holds one: one check on the small array.
    if not torch.isfinite(absmax).all():
        raise ConfigError(f"{what}: weight holds inf or NaN values; NF4 cannot store them")


def _with_scales(nf4: NF4Tensor, absmax: torch.Tensor, double_quant: bool) -> NF4Tensor:
    """Store the fp32 block scales in `nf4`, double-quantized or not."""
    if not double_quant:
        nf4.absmax = absmax
        return nf4
    # QLoRA sec. 3: the scales are positive, so centre them on their mean to use the signed
    # 8-bit map's full range (bnb: offset = absmax.mean(); quantize_blockwise(absmax - offset)).
    offset = absmax.mean()
    absmax_codes, absmax_scale = quantize_blockwise(absmax - offset, dynamic_map(absmax.device),
                                                    DOUBLE_QUANT_BLOCK)
    nf4.absmax_codes = absmax_codes.reshape(-1)[: absmax.numel()].clone()
    nf4.absmax_scale, nf4.absmax_offset = absmax_scale, offset
    return nf4


def quantize_nf4(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True
                 ) -> NF4Tensor:
    """Quantize a float tensor of any shape to NF4 (bnb `quantize_4bit(quant_type="nf4",
    compress_statistics=double_quant)`)."""
    _check_block_size(block_size)
    with torch.no_grad():
        weight = _checked(weight, "quantize_nf4")
        indices, absmax = quantize_blockwise(weight, nf4_codebook(weight.device), block_size)
        _check_finite(absmax, "quantize_nf4")
        nf4 = NF4Tensor(codes=pack_nibbles(indices), shape=weight.shape, dtype=weight.dtype,
                        block_size=block_size)
        return _with_scales(nf4, absmax, double_quant)


def requantize_nf4(nf4: NF4Tensor, weight: torch.Tensor) -> NF4Tensor:
    """Quantize `weight` (nf4's shape) onto nf4's existing grid (dequantize-add-requantize).

    Each block keeps its stored scale unless the new block outgrows it; only then are the scales
    re-encoded. So a zero change gives back the same codes, and a small change only moves the
    codes it pushes past a midpoint, instead of re-rounding the whole matrix.
    """
    if tuple(weight.shape) != tuple(nf4.shape):
        raise ConfigError(f"requantize_nf4: weight shape {list(weight.shape)} != stored shape "
                          f"{list(nf4.shape)}")
    with torch.no_grad():
        weight = _checked(weight, "requantize_nf4")
        scales = nf4.scales()
        new_absmax = _blocks(weight.reshape(-1).float(), nf4.block_size).abs().amax(dim=1)
        _check_finite(new_absmax, "requantize_nf4")
        grown = new_absmax > scales
        result = NF4Tensor(codes=nf4.codes, shape=nf4.shape, dtype=nf4.dtype,
                           block_size=nf4.block_size)
        if grown.any():
            result = _with_scales(result, torch.where(grown, new_absmax, scales), nf4.double_quant)
            scales = result.scales()
        else:
            for name, tensor in nf4.stored_tensors().items():
                setattr(result, name, tensor.clone())
        indices, _ = quantize_blockwise(weight, nf4_codebook(weight.device), nf4.block_size,
                                        absmax=scales)
        result.codes = pack_nibbles(indices)
        return result


def dequantize_nf4_reference(nf4: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The slow twin: unpack nibbles, look up, scale in fp32, cast (bnb's dequantize_4bit math)."""
    values = dequantize_blockwise(unpack_nibbles(nf4.codes), nf4.scales(),
                                  nf4_codebook(nf4.device), nf4.block_size)
    return values[: nf4.numel].view(nf4.shape).to(dtype or nf4.dtype)


@lru_cache(maxsize=32)
def _byte_pair_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """For 2-byte dtypes: a 65536-entry table mapping two packed bytes (read as one uint16) to the
    four values they hold, stored as int64 so one gather moves all four. 4-byte dtypes: a
    256-entry table, one byte -> two values, as int64."""
    code = _codebook_cpu()
    if dtype.itemsize == 2:
        word = torch.arange(65536)
        # The uint16 view of [b0, b1] is b0 + 256 * b1 on a little-endian machine.
        first, second = (word & 0xFF, word >> 8) if sys.byteorder == "little" else (word >> 8,
                                                                                 word & 0xFF)
        table = torch.stack([code[first >> 4], code[first & 0xF],
                             code[second >> 4], code[second & 0xF]], dim=1)
    else:
        byte = torch.arange(256)
        table = torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)
    return table.to(dtype).contiguous().view(torch.int64).reshape(-1).to(device)


def decode_nf4(codes: torch.Tensor, scales: torch.Tensor, block_size: int, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The fast path: packed codes uint8 [k] (whole blocks) and block scales [2k / block_size]
    (already in `dtype`) -> values [2k] in `dtype`. One table gather per 4 (16-bit dtypes) or 2
    (fp32) elements straight into `dtype`, then one in-place multiply by the scales in `dtype`.
    `out`: an optional int64 buffer of k / 2 (16-bit) or k (fp32) elements to write into."""
    table = _byte_pair_table(dtype, codes.device)
    index = codes.view(torch.uint16).int() if dtype.itemsize == 2 else codes.int()
    values = torch.index_select(table, 0, index, out=out).view(dtype).view(-1, block_size)
    values.mul_(scales.unsqueeze(1))
    return values.view(-1)


# Blocks decoded per step of `dequantize_nf4`: bounds the int32 index temporary (~1 MB) so it
# stays in cache instead of being a second full-size array.
DECODE_BLOCKS = 4096


def dequantize_nf4(nf4: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize with `decode_nf4`, a few thousand blocks at a time straight into the output.
    For fp32 the result equals the reference bit for bit; for bf16/fp16 the codebook value and the
    scale are each rounded to `dtype` before the product (no fp32 copy of the whole matrix), so
    results may differ from the reference by an ulp."""
    dtype = dtype or nf4.dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"dequantize_nf4: dtype must be float32, bfloat16 or float16, "
                          f"got {dtype}")
    block = nf4.block_size
    scales = nf4.scales().to(dtype)
    # zeros, not empty: the pages are faulted in by one parallel fill up front; first-touching
    # them inside each chunk's gather made 2-thread runs 10-30x slower on a loaded CPU.
    out = torch.zeros(scales.numel() * block, dtype=dtype, device=nf4.device)
    words = out.view(torch.int64)  # the table entries' view of the output
    per_word = 8 // dtype.itemsize
    for first in range(0, scales.numel(), DECODE_BLOCKS):
        last = min(first + DECODE_BLOCKS, scales.numel())
        decode_nf4(nf4.codes[first * block // 2: last * block // 2], scales[first:last], block,
                   dtype, out=words[first * block // per_word: last * block // per_word])
    return out[: nf4.numel].view(nf4.shape)
