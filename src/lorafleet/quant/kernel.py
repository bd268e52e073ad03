"""A fused NF4 decode+matmul CPU kernel for few tokens (decode), built on first use.

Plain torch ops cannot decode NF4 without writing the decoded weight to memory first (a table
gather, then the matmul reads it back), which bounds a 1-token forward at ~2.5x a bf16 matmul.
This kernel never materializes W: each 16 bytes of codes are widened to 32-bit lanes, the two
nibbles looked up in the 16-entry codebook held in ONE AVX-512 register (`vpermps`), scaled,
and multiplied into fp32 accumulators together with the matching inputs. It reads 0.52 bytes
per weight instead of 2 (bf16), so at 1 token it is ~2.5x faster than a bf16 nn.Linear, and it
stays within ~1.5x of one up to 32 tokens (7-10x faster than the torch path at 1 token, ~2.5x at
16). Past 32 tokens (prefill, training) the torch path's chunked decode + bf16 matmul is used.

The C source is compiled with the system C compiler (`cc -O3 -march=native`, ~0.3 s) into a
per-user cache and loaded with ctypes (no torch headers, no build step at install). Anything
missing (no compiler, no AVX-512, not x86-64 Linux, `LORAFLEET_NF4_KERNEL=0`) makes
`nf4_kernel_linear` return None and the caller falls back to the torch path; the reason is
logged once. The kernel runs on one thread (ctypes releases the GIL during the call).

Numerics: each weight is cb[code] * scale in fp32 (exactly the reference's fp32 dequantized
value). fp32/fp16 inputs: multiplied by x in fp32, summed in fp32 (= the fp32 reference up to
summation order). bf16 inputs (AVX512-BF16 CPUs): the weight is rounded to bf16 as the
reference rounds it, and the products of the bf16 pairs are summed in fp32 (`vdpbf16ps`); the
output is rounded to x's dtype once, as F.linear's is.
"""
from __future__ import annotations

import ctypes
import logging
from functools import lru_cache
from pathlib import Path

import torch

from lorafleet.native import build_library

from .nf4 import DOUBLE_QUANT_BLOCK, NF4Tensor, dynamic_map, nf4_codebook

assert DOUBLE_QUANT_BLOCK == 256  # the C source's `i / 256`

log = logging.getLogger(__name__)

# Up to this many tokens the kernel is used (2-core EPYC dev box, 1 thread, 4096x4096, ms):
#   tokens              1     4     8     16    32
#   bf16 kernel         0.69  1.03  1.72  2.79  5.68
#   fp32 kernel         0.64  1.37  2.16  4.06  7.93
#   torch path          5.0   7.0   ~6.5  6.6   ~8
#   bf16 nn.Linear      1.8   1.7   2.0   2.5   3.8
# (the fp32 kernel serves fp32/fp16 inputs, and bf16 where the CPU lacks AVX512-BF16).
KERNEL_MAX_TOKENS = 32
FP32_KERNEL_MAX_TOKENS = 16

# The C source sits beside this file.
_SOURCE = (Path(__file__).parent / "nf4_kernel.c").read_text()

_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC")


@lru_cache(maxsize=None)
def _load() -> ctypes.CDLL | None:
    """Compile (once per source/flags/machine, cached on disk) and load the kernel, or None."""
    lib = build_library("nf4_kernel", "NF4 kernel", _SOURCE, _FLAGS, "LORAFLEET_NF4_KERNEL",
                        log)
    if lib is None:
        return None
    lib.has_bf16 = hasattr(lib, "nf4_linear_bf16")  # compiled only where the CPU has AVX512-BF16
    for fn in [lib.nf4_linear] + ([lib.nf4_linear_bf16] if lib.has_bf16 else []):
        fn.restype = None
        fn.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_float] + [ctypes.c_void_p] * 4
                       + [ctypes.c_long] * 4)
    return lib


def kernel_available() -> bool:
    """Whether the fused kernel is built (or can be) and loaded on this machine."""
    return _load() is not None


def nf4_kernel_linear(x2d: torch.Tensor, nf4: NF4Tensor) -> torch.Tensor | None:
    """x [T, in] @ W^T -> fp32 [T, out] with the fused kernel, or None where it does not apply
    (not CPU, too many tokens, block size not a multiple of 64, ragged rows, no kernel)."""
    out_features, in_features = nf4.shape
    tokens = x2d.shape[0]
    if (x2d.device.type != "cpu" or not 0 < tokens <= KERNEL_MAX_TOKENS or nf4.block_size % 64
            or in_features % nf4.block_size or len(nf4.shape) != 2):
        return None
    lib = _load()
    if lib is None:
        return None
    bf16 = x2d.dtype == torch.bfloat16 and lib.has_bf16
    if not bf16 and tokens > FP32_KERNEL_MAX_TOKENS:
        return None
    n_blocks = in_features // nf4.block_size
    if bf16:  # [T, nb, bs/32, 2, 16]: per 16 bytes of codes, 16 high-nibble x then 16 low-nibble
        xs = x2d.view(tokens, n_blocks, -1, 16, 2).transpose(-1, -2).contiguous()
    else:  # [T, nb, 2, bs/2]: each block's even elements, then its odd ones, in fp32
        xs = x2d.float().view(tokens, n_blocks, -1, 2).transpose(-1, -2).contiguous()
    # the scales are decoded inside the kernel, block by block (a torch pass over all of them
    # took 0.2 ms of a 0.7 ms 1-token forward)
    # (the tensors stay referenced by `stored` until the call returns)
    stored = {n: t.float().contiguous() if n == "absmax" else t.contiguous()
              for n, t in nf4.stored_tensors().items()}
    if nf4.double_quant:  # the C side hard-codes DOUBLE_QUANT_BLOCK (256) scales per scale
        scales = (None, stored["absmax_codes"].data_ptr(), stored["absmax_scale"].data_ptr(),
                  float(stored["absmax_offset"]), dynamic_map().data_ptr())
    else:
        scales = (stored["absmax"].data_ptr(), None, None, 0.0, None)
    y = torch.empty(tokens, out_features, dtype=torch.float32)
    kernel = lib.nf4_linear_bf16 if bf16 else lib.nf4_linear
    kernel(stored["codes"].data_ptr(), *scales, nf4_codebook().data_ptr(), xs.data_ptr(),
           y.data_ptr(), out_features, in_features, nf4.block_size, tokens)
    return y
