"""One dtype flag for every job: `auto | bfloat16 | float16 | float32` (aliases bf16, fp16, fp32).

`auto` picks what the checkpoint declares (`torch_dtype`, or transformers 5's `dtype`, in its
config.json) when the device computes it well, else float32:

- CUDA: bf16 where the GPU supports it (Ampere and newer), fp16 as declared.
- CPU: bf16 only with bf16 instructions (AVX512-BF16 or AMX), where bf16 matmuls run several
  times faster than fp32 (DESIGN.md sec. 4); fp16 never (no fast fp16 matmul on CPU).
- A float32 checkpoint stays float32: training's reduced precision is a choice, not a default
  (serving jobs pass `prefer_half=True` to take bf16 where the device computes it).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from lorafleet.errors import ConfigError

AUTO = "auto"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "float": torch.float32}
DTYPE_CHOICES = (AUTO, "bfloat16", "float16", "float32", "bf16", "fp16", "fp32")
# CPU flags (/proc/cpuinfo) that give fast bf16 matmuls (oneDNN uses them).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def parse_dtype(value: str | torch.dtype, field: str = "dtype") -> torch.dtype | str:
    """A torch dtype for a name or alias, or the string "auto" (resolve it with `resolve_dtype`).
    ConfigError naming `field` and the accepted names otherwise."""
    if isinstance(value, torch.dtype):
        return value
    name = str(value).strip().lower().removeprefix("torch.")
    if name == AUTO:
        return AUTO
    if name not in DTYPES:
        raise ConfigError(f"{field}: unknown dtype {value!r}; expected one of "
                          f"{', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def checkpoint_dtype(model_dir: str | Path | None) -> torch.dtype | None:
    """The dtype a Hugging Face config.json declares (`torch_dtype` or `dtype`), if any."""
    if model_dir is None:
        return None
    config_file = Path(model_dir) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    declared = config.get("dtype") or config.get("torch_dtype")
    if not isinstance(declared, str):
        return None
    try:
        parsed = parse_dtype(declared)
    except ConfigError:
        return None
    return parsed if isinstance(parsed, torch.dtype) else None


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has bf16 matmul instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in BF16_CPU_FLAGS)


def device_computes(dtype: torch.dtype, device: str | torch.device) -> bool:
    """Whether `device` runs matmuls in `dtype` at least as fast as in float32."""
    if dtype == torch.float32:
        return True
    device = torch.device(device)
    if device.type == "cuda":
        if dtype == torch.bfloat16:
            return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return dtype == torch.float16
    if device.type == "cpu":
        return dtype == torch.bfloat16 and cpu_has_fast_bf16()
    return False


def resolve_dtype(value: str | torch.dtype, model_dir: str | Path | None = None,
                  device: str | torch.device = "cpu", prefer_half: bool = False,
                  field: str = "dtype") -> torch.dtype:
    """The dtype a job runs in. An explicit dtype is kept; "auto" takes the checkpoint's declared
    16-bit dtype where the device computes it (bf16 instead of fp16 on a CPU with bf16
    instructions), else float32. `prefer_half` (serving, generation): bf16 where the device
    computes it, whatever 16- or 32-bit dtype the checkpoint declares."""
    parsed = parse_dtype(value, field)
    if isinstance(parsed, torch.dtype):
        return parsed
    declared = checkpoint_dtype(model_dir)
    candidates = []
    if prefer_half:
        candidates.append(torch.bfloat16)
    if declared is not None and declared != torch.float32:
        candidates += [declared, torch.bfloat16]
    for dtype in candidates:
        if device_computes(dtype, device):
            return dtype
    return torch.float32


def add_dtype_argument(parser, default: str = AUTO, help_suffix: str = "") -> None:
    """`--dtype auto|bfloat16|float16|float32` (aliases bf16/fp16/fp32), the same for every job."""
    parser.add_argument(
        "--dtype", default=default, type=str.lower, choices=DTYPE_CHOICES, metavar="DTYPE",
        help="auto|bfloat16|float16|float32 (bf16/fp16/fp32 accepted); auto: the checkpoint's "
             "dtype where the device computes it well, else float32" + help_suffix
             + f" (default {default})")
