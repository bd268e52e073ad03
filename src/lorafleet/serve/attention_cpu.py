"""Paged decode attention on CPU, reading K/V rows where they sit in the pool (vLLM's CPU
paged-attention idea), built on first use.

The torch path (attention.py: `KVGather` + `decode_attention`) first copies every decode
sequence's keys and values out of the pages into a padded `[B, max_len, kv_dim]` batch, then
transposes them for two batched matmuls: three passes over the context per layer, and the
gathers run at a few GB/s for 256-number rows. This kernel makes one pass: for each sequence and
KV head it reads each key row once for all the query heads that share it (GQA), takes a
softmax in float32, then reads each value row once. It stops at the sequence's own length (no
padding), so it reads exactly the KV bytes the step needs.

Numerics: dot products, softmax and the weighted sum in float32 (the torch path rounds the
scores to the model dtype before its float32 softmax); bf16 outputs rounded once. float32 and
bfloat16 pools; `LORAFLEET_ATTENTION_KERNEL=0` turns it off.
"""
from __future__ import annotations

import ctypes
import logging
import os
from functools import lru_cache
from pathlib import Path

import torch

from lorafleet.native import C_HELPERS, build_library

log = logging.getLogger(__name__)

# The C source sits beside this file (C_HELPERS prepended: bf16 conversions, row loads).
_SOURCE = C_HELPERS + (Path(__file__).parent / "attention_cpu.c").read_text()

_FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-shared", "-fPIC",
          "-lm")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


@lru_cache(maxsize=None)
def _load() -> ctypes.CDLL | None:
    lib = build_library("paged_attention", "paged attention kernel", _SOURCE, _FLAGS,
                        "LORAFLEET_ATTENTION_KERNEL", log)
    if lib is not None:
        lib.paged_decode.restype = None
        lib.paged_decode.argtypes = ([ctypes.c_void_p, ctypes.c_long] + [ctypes.c_void_p] * 3
                                     + [ctypes.c_long] * 2 + [ctypes.c_void_p] * 2
                                     + [ctypes.c_long] * 3 + [ctypes.c_float, ctypes.c_int,
                                                                ctypes.c_long])
    return lib


def decode_kernel_available(kv: torch.Tensor) -> bool:
    """Whether `paged_decode_attention` serves this pool (CPU, float32/bfloat16, contiguous,
    kernel built, not switched off by LORAFLEET_ATTENTION_KERNEL=0, read at each call)."""
    return (os.environ.get("LORAFLEET_ATTENTION_KERNEL", "1") != "0" and kv.device.type == "cpu"
            and kv.dtype in _DTYPES and kv.is_contiguous() and _load() is not None)


def paged_decode_attention(q: torch.Tensor, kv_rows: torch.Tensor, k_slots: torch.Tensor,
                           v_slots: torch.Tensor, lens: torch.Tensor, scale: float,
                           threads: int | None = None) -> torch.Tensor:
    """q [B, nh, hd]; kv_rows [R, kv_dim] (the pool's K/V rows); k_slots, v_slots int64
    [B, max_len]: row of each sequence's position l (valid for l < lens[b]); lens int64 [B]
    -> [B, nh, hd] in q's dtype (the pool's). Sequences are shared among `threads` OpenMP
    threads (default: torch's intra-op thread count)."""
    B, n_heads, head_dim = q.shape
    n_kv = kv_rows.shape[1] // head_dim
    q = q.contiguous().to(kv_rows.dtype)
    out = torch.empty_like(q)
    _load().paged_decode(kv_rows.data_ptr(), kv_rows.shape[1], k_slots.data_ptr(),
                         v_slots.data_ptr(), lens.data_ptr(), B, k_slots.shape[1], q.data_ptr(),
                         out.data_ptr(), n_heads, n_kv, head_dim, scale,
                         _DTYPES[kv_rows.dtype], threads or torch.get_num_threads())
    return out
