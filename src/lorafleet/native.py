"""Build and load a small C kernel with the system compiler: the CPU fast paths' shared plumbing.

The source is compiled once per (source, compiler, flags, host CPU) into a per-user cache
(`$XDG_CACHE_HOME/lorafleet` or `~/.cache/lorafleet`) and loaded with ctypes: no torch headers,
no build step at install. Anything missing (no compiler, not x86-64 Linux, a compile error, or
the kernel's switch set to 0 in the environment) gives None, the reason logged once, and the
caller keeps its plain PyTorch path. ctypes releases the GIL during a call.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lorafleet"


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def build_library(name: str, label: str, source: str, flags: tuple[str, ...], switch: str,
                  logger: logging.Logger = log) -> ctypes.CDLL | None:
    """Compile `source` (cached on disk as `{name}_{key}.so`) and load it, or None where that
    cannot be done (logged to `logger` as "{label} unavailable ..."). `switch`: environment
    variable that disables the kernel when set to "0"."""
    if os.environ.get(switch, "1") == "0":
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        logger.warning("%s: needs x86-64 Linux; using the slower torch path", label)
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("%s: no C compiler found; using the slower torch path (`lorafleet env` "
                       "lists the kernels)", label)
        return None
    # -march=native: the key includes the host CPU, so a cache shared across machines is safe
    key = hashlib.sha256("\0".join((source, compiler, *flags, cpu_flags())).encode()
                         ).hexdigest()[:16]
    path = cache_dir() / f"{name}_{key}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                src, lib = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
                src.write_text(source)
                subprocess.run([compiler, *flags, str(src), "-o", str(lib)], check=True,
                               capture_output=True, timeout=120)
                os.replace(lib, path)  # atomic: concurrent builders never see half a file
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        logger.warning("%s unavailable (%s %s); using the torch path", label, error,
                 detail.decode(errors="replace")[-300:])
        return None


# C helpers shared by the kernels' sources (prepended to them): bf16 <-> fp32 as torch does it,
# and a row load into fp32. -DLORAFLEET_PORTABLE leaves out the AVX-512 paths (tests build it).
C_HELPERS = r"""
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && !defined(LORAFLEET_PORTABLE)
#define LF_AVX512 1
#include <immintrin.h>
#endif

static inline float from_bf16(uint16_t v) {
    uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline uint16_t to_bf16(float f) {        /* round to nearest even, as torch does */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);   /* quiet NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* dst[0:n] = src[0:n] in fp32; src fp32, or bf16 when bf16 != 0 */
static inline void load_row(const void *src, float *dst, long n, int bf16) {
    if (!bf16) { memcpy(dst, src, sizeof(float) * n); return; }
    const uint16_t *s = src;
    long i = 0;
#ifdef LF_AVX512
    for (; i + 16 <= n; i += 16) {
        __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(s + i)));
        _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
    }
#endif
    for (; i < n; i++) dst[i] = from_bf16(s[i]);
}
"""

