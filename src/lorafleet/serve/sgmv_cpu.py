"""Batched heterogeneous LoRA on CPU reading the pool pages in place (Punica SGMV / S-LoRA
MBGMM+MBGMV as one C function), built on first use.

PyTorch on CPU has no operator that multiplies each row by its own adapter's weights where those
weights sit scattered over pool pages: the torch paths (lora_ops.py) first gather the step's
adapters into one contiguous stack (~1 ms per change of adapter set at 1000 adapters) and then
either multiply every row by every adapter (dense, masked) or pay two framework calls per
adapter (grouped). This kernel does neither: one call per module, and for each segment (rows
sharing an adapter) it

    shrink:  h[t, k] = sum_i x[t, i] * A[k, i]            A row k read from its pages
    expand:  y[t, o] = round(y[t, o] + scaling * sum_k h[t, k] * Bt[k, o])

with float32 accumulation, rows taken four at a time so each weight is loaded once per four rows.
It reads each resident adapter's A and B^T exactly once per step, only the useful multiply-adds,
and nothing is copied. float32 and bfloat16 pools (bf16 -> fp32 by a 16-bit shift, fp32 -> bf16
round-to-nearest-even, as torch rounds). Written in plain C for the compiler to vectorize
(-O3 -march=native); `LORAFLEET_SGMV_KERNEL=0` turns it off.
"""
from __future__ import annotations

import ctypes
import logging
import os
from functools import lru_cache

import torch

from lorafleet.native import build_library

from .lora_ops import PagedModuleLora

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define RB 4      /* rows per block: each weight vector is loaded once per RB rows */

static inline float from_bf16(uint16_t v) {
    uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline uint16_t to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);   /* quiet NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* One element type T for pages/x/y, loaded with LOAD and stored with STORE. */
#define SGMV(NAME, T, LOAD, STORE)                                                              \
void NAME(const T *pages, long H, const T *x, long ldx, T *y, long ldy, long in, long out,     \
          long nseg, const int32_t *seg_rows, const int32_t *seg_rank, const float *seg_scale, \
          const int32_t *seg_a, const int32_t *seg_b, const int32_t *page_ids,                 \
          long a_ppr, long b_ppr, long max_rank) {                                             \
    float *xf = malloc(sizeof(float) * RB * in);          /* the block's rows, in fp32 */       \
    float *acc = malloc(sizeof(float) * RB * out);        /* its delta, before scaling */       \
    float *w = malloc(sizeof(float) * (in > out ? in : out));   /* one weight row, fp32 */      \
    float *h = malloc(sizeof(float) * RB * max_rank);                                           \
    for (long s = 0; s < nseg; s++) {                                                           \
        const long r = seg_rank[s];                                                             \
        const float scale = seg_scale[s];                                                       \
        const int32_t *a_ids = page_ids + seg_a[s], *b_ids = page_ids + seg_b[s];               \
        for (long t0 = seg_rows[2 * s]; t0 < seg_rows[2 * s + 1]; t0 += RB) {                   \
            const long nt = seg_rows[2 * s + 1] - t0 < RB ? seg_rows[2 * s + 1] - t0 : RB;      \
            for (long t = 0; t < nt; t++)                                                       \
                for (long i = 0; i < in; i++) xf[t * in + i] = LOAD(x[(t0 + t) * ldx + i]);     \
            /* shrink: h[t, k] = x[t] . A[k] */                                                 \
            for (long k = 0; k < r; k++) {                                                      \
                for (long j = 0, i0 = 0; i0 < in; j++, i0 += H) {                               \
                    const T *src = pages + (long)a_ids[k * a_ppr + j] * H;                      \
                    const long n = in - i0 < H ? in - i0 : H;                                   \
                    for (long i = 0; i < n; i++) w[i0 + i] = LOAD(src[i]);                      \
                }                                                                               \
                for (long t = 0; t < nt; t++) {                                                 \
                    float lanes[16] = {0};                                                      \
                    const float *xt = xf + t * in;                                              \
                    long i = 0;                                                                 \
                    for (; i + 16 <= in; i += 16)                                               \
                        for (int l = 0; l < 16; l++) lanes[l] += xt[i + l] * w[i + l];          \
                    float sum = 0;                                                              \
                    for (; i < in; i++) sum += xt[i] * w[i];                                    \
                    for (int l = 0; l < 16; l++) sum += lanes[l];                               \
                    h[t * max_rank + k] = sum;                                                  \
                }                                                                               \
            }                                                                                   \
            /* expand: acc[t] = sum_k h[t, k] * Bt[k] */                                        \
            memset(acc, 0, sizeof(float) * nt * out);                                           \
            for (long k = 0; k < r; k++) {                                                      \
                for (long j = 0, o0 = 0; o0 < out; j++, o0 += H) {                              \
                    const T *src = pages + (long)b_ids[k * b_ppr + j] * H;                      \
                    const long n = out - o0 < H ? out - o0 : H;                                 \
                    for (long o = 0; o < n; o++) w[o0 + o] = LOAD(src[o]);                      \
                }                                                                               \
                for (long t = 0; t < nt; t++) {                                                 \
                    const float ht = h[t * max_rank + k];                                       \
                    float *at = acc + t * out;                                                  \
                    for (long o = 0; o < out; o++) at[o] += ht * w[o];                          \
                }                                                                               \
            }                                                                                   \
            for (long t = 0; t < nt; t++) {                                                     \
                T *yt = y + (t0 + t) * ldy;                                                     \
                const float *at = acc + t * out;                                                \
                for (long o = 0; o < out; o++) yt[o] = STORE(LOAD(yt[o]) + scale * at[o]);      \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    free(xf); free(acc); free(w); free(h);                                                      \
}

#define ID(v) (v)
SGMV(sgmv_f32, float, ID, ID)
SGMV(sgmv_bf16, uint16_t, from_bf16, to_bf16)
"""

_FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-shared", "-fPIC")
_KERNELS = {torch.float32: "sgmv_f32", torch.bfloat16: "sgmv_bf16"}


@lru_cache(maxsize=None)
def _load() -> ctypes.CDLL | None:
    lib = build_library("sgmv_kernel", "SGMV kernel", _SOURCE, _FLAGS,
                        "LORAFLEET_SGMV_KERNEL", log)
    if lib is None:
        return None
    for name in _KERNELS.values():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = ([ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long,
                        ctypes.c_void_p] + [ctypes.c_long] * 4 + [ctypes.c_void_p] * 6
                       + [ctypes.c_long] * 3)
    return lib


def sgmv_cpu_available(pages: torch.Tensor) -> bool:
    """Whether `sgmv_cpu` serves a pool like this one (CPU, float32/bfloat16, kernel built, not
    switched off by LORAFLEET_SGMV_KERNEL=0, read at each call so tests can force the torch
    paths)."""
    return (os.environ.get("LORAFLEET_SGMV_KERNEL", "1") != "0" and pages.device.type == "cpu"
            and pages.dtype in _KERNELS and _load() is not None)


def sgmv_cpu(y: torch.Tensor, x: torch.Tensor, pages: torch.Tensor,
             module: PagedModuleLora) -> None:
    """y [T, out] += the batch's heterogeneous LoRA delta for x [T, in], in place. y, x and
    pages share the pool's dtype; rows may be strided, each row contiguous. The caller checked
    `sgmv_cpu_available(pages)`."""
    if x.stride(-1) != 1 or y.stride(-1) != 1:
        raise ValueError("sgmv_cpu needs rows with contiguous elements")
    if x.dtype != pages.dtype or y.dtype != pages.dtype:
        raise ValueError(f"sgmv_cpu: x {x.dtype} and y {y.dtype} must be the pool's "
                         f"{pages.dtype}")
    kernel = getattr(_load(), _KERNELS[pages.dtype])
    kernel(pages.data_ptr(), pages.shape[1], x.data_ptr(), x.stride(0), y.data_ptr(),
           y.stride(0), module.in_features, module.out_features, module.seg_rank.shape[0],
           module.seg_rows.data_ptr(), module.seg_rank.data_ptr(), module.seg_scale.data_ptr(),
           module.seg_a.data_ptr(), module.seg_b.data_ptr(), module.page_ids.data_ptr(),
           module.a_pages_per_row, module.b_pages_per_row, max(module.max_rank, 1))
