"""Batched heterogeneous LoRA on CPU reading the pool pages in place (Punica SGMV / S-LoRA
MBGMM+MBGMV as one C function), built on first use.

PyTorch on CPU has no operator that multiplies each row by its own adapter's weights where those
weights sit scattered over pool pages: the torch fallback (lora_ops.sgmv_torch) copies a
module's segments out of the pool into one contiguous stack on every call and then either
multiplies every row by every adapter (dense, masked) or pays two framework calls per adapter
(grouped). This kernel does neither: one call per module, and for each segment (rows sharing an
adapter) it

    shrink:  h[t, k] = sum_i x[t, i] * A[k, i]            A row k read from its pages
    expand:  y[t, o] = round(y[t, o] + scaling * sum_k h[t, k] * Bt[k, o])

with float32 accumulation; nothing is copied out of the pool and only the useful multiply-adds
are done. How (AVX-512, the native build):
- rows in blocks of 4 and ranks in blocks of 4 in registers, so each weight vector is loaded
  once per four rows; kernels specialised for 1-3 rows (decode segments are mostly 1-2 rows);
- bf16 pools on AVX512-BF16 CPUs: the shrink multiplies bf16 pairs with `vdpbf16ps` straight
  from the pages; the expand on B^T rows interleaved in pairs, with h rounded to bf16 first (as
  PEFT's bf16 `lora_A` output is). Otherwise bf16 -> fp32 by a 16-bit shift and fp32 FMAs;
- the next weight rows are prefetched (2 KB pages scattered over the pool);
- OpenMP threads (torch's intra-op count) take chunks of 16 rows of a segment.
y is rounded once (fp32 -> bf16 round-to-nearest-even, as torch rounds). Builds for CPUs
without AVX512-BF16 and a portable C build (VARIANTS) are tested on every machine that can
build them; `LORAFLEET_SGMV_KERNEL=0` turns the kernel off.
"""
from __future__ import annotations

import ctypes
import logging
import os
from functools import lru_cache
from pathlib import Path

import torch

from lorafleet.native import C_HELPERS, build_library

from .lora_ops import PagedModuleLora

log = logging.getLogger(__name__)

# The C source sits beside this file (C_HELPERS prepended: bf16 conversions, row loads).
_SOURCE = C_HELPERS + (Path(__file__).parent / "sgmv_cpu.c").read_text()

_FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-shared", "-fPIC")
_KERNELS = {torch.float32: "sgmv_f32", torch.bfloat16: "sgmv_bf16"}


# Builds of the same source for CPUs with less (tests run each here): without AVX512-BF16
# (fp32 FMAs after converting), and portable C for the compiler to vectorize.
VARIANTS = {"native": (), "avx512f": ("-mno-avx512bf16",), "portable": ("-DLORAFLEET_PORTABLE",)}


@lru_cache(maxsize=None)
def _load(variant: str = "native") -> ctypes.CDLL | None:
    lib = build_library("sgmv_kernel", "SGMV kernel", _SOURCE, _FLAGS + VARIANTS[variant],
                        "LORAFLEET_SGMV_KERNEL", log)
    if lib is None:
        return None
    for name in _KERNELS.values():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = ([ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long,
                        ctypes.c_void_p] + [ctypes.c_long] * 4 + [ctypes.c_void_p] * 6
                       + [ctypes.c_long] * 4)
    return lib


def sgmv_cpu_available(pages: torch.Tensor) -> bool:
    """Whether `sgmv_cpu` serves a pool like this one (CPU, float32/bfloat16, kernel built, not
    switched off by LORAFLEET_SGMV_KERNEL=0, read at each call so tests can force the torch
    paths)."""
    return (os.environ.get("LORAFLEET_SGMV_KERNEL", "1") != "0" and pages.device.type == "cpu"
            and pages.dtype in _KERNELS and _load() is not None)


def sgmv_cpu(y: torch.Tensor, x: torch.Tensor, pages: torch.Tensor,
             module: PagedModuleLora, variant: str = "native", threads: int | None = None
             ) -> None:
    """y [T, out] += the batch's heterogeneous LoRA delta for x [T, in], in place. y, x and
    pages share the pool's dtype; rows may be strided, each row contiguous. The caller checked
    `sgmv_cpu_available(pages)`. bf16 on AVX512-BF16 CPUs: h = x A^T is rounded to bf16
    before the expand (as PEFT's bf16 lora_A output is). threads: OpenMP threads over chunks
    of 16 rows (default: torch's intra-op thread count)."""
    if x.stride(-1) != 1 or y.stride(-1) != 1:
        raise ValueError("sgmv_cpu needs rows with contiguous elements")
    if x.dtype != pages.dtype or y.dtype != pages.dtype:
        raise ValueError(f"sgmv_cpu: x {x.dtype} and y {y.dtype} must be the pool's "
                         f"{pages.dtype}")
    kernel = getattr(_load(variant), _KERNELS[pages.dtype])
    kernel(pages.data_ptr(), pages.shape[1], x.data_ptr(), x.stride(0), y.data_ptr(),
           y.stride(0), module.in_features, module.out_features, module.seg_rank.shape[0],
           module.seg_rows.data_ptr(), module.seg_rank.data_ptr(), module.seg_scale.data_ptr(),
           module.seg_a.data_ptr(), module.seg_b.data_ptr(), module.page_ids.data_ptr(),
           module.a_pages_per_row, module.b_pages_per_row, max(module.max_rank, 1),
           threads or torch.get_num_threads())
