"""The Hugging Face PEFT adapter folder, both ways.

    adapter_config.json          LoraConfig fields + "peft_type": "LORA"
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight        [r, in]
                                 base_model.model.<module>.lora_B.weight        [out, r]
                                 base_model.model.<module>.lora_embedding_A     [r, vocab]
                                 base_model.model.<module>.lora_embedding_B     [dim, r]
                                 base_model.model.<module>.lora_magnitude_vector [out] (use_dora)
                                 base_model.model.<module>.base_layer.bias      (bias="lora_only"/"all")
                                 base_model.model.<module>.<param>              (modules_to_save)

Keys carry no adapter name (PEFT strips it on save and adds the caller's on load). Only
safetensors are read: a pickled `.bin`/`.pt` file can run arbitrary code when loaded.

This is the one reader of the format: `load_peft` returns a `PeftAdapter` (the LoraConfig plus,
per module, A, B, rank, alpha and scaling) that loading into a model, merging and the serving
engine all use; `load_peft(path, header_only=True)` reads the config and the safetensors header
only (names, shapes, dtypes), which is what a registry of thousands of adapters keeps.
Putting a parsed adapter into a model and taking one out (`save_adapter`, `load_adapter`) is
lora/peft_model.py's: this module knows files and keys, not LoRA layers.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafleet.errors import AdapterError, ConfigError, ShapeError
from lorafleet.lora.config import LoraConfig
from lorafleet.models.config import read_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# numpy storage of each float dtype's elements (bf16 has no numpy type: its bits as uint16).
NUMPY_STORAGE = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}
# safetensors' own limit on the JSON header (100 MB): past it the file is not one.
MAX_HEADER_BYTES = 100_000_000


# -- reading: one parsed adapter ----------------------------------------------------------------
# Dtypes an adapter's tensors may have (safetensors header names -> torch). An integer or float8
# tensor in an adapter is an error, not something to cast silently.
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                "BF16": torch.bfloat16}
# What follows ".lora_" in a key -> (which half, embedding LoRA).
_PARTS = {"A.weight": ("A", False), "B.weight": ("B", False), "embedding_A": ("A", True),
          "embedding_B": ("B", True), "magnitude_vector": ("M", False)}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the safetensors header describes it (no data)."""
    shape: tuple[int, ...]
    dtype: str                          # safetensors name: "F32", "BF16", "I32", ...
    offset: int = 0                     # its bytes in the file's data section: [offset, +nbytes)
    nbytes: int = 0


@dataclass
class LoraModule:
    """One adapted module: A [r, in] and B [out, r] (embedding: A [r, vocab], B [dim, r]).
    A and B are None when only the header was read."""
    name: str                            # module name in the model (PEFT key minus prefix)
    rank: int
    alpha: float
    scaling: float                       # config.scaling(rank, alpha): the factor on B A
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    embedding: bool = False
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None   # DoRA's m [out] (use_dora), else None
    m_shape: tuple[int] | None = None

    @property
    def use_dora(self) -> bool:
        return self.m_shape is not None


@dataclass
class PeftAdapter:
    """A PEFT adapter folder, parsed: the config, every LoRA module with its rank, alpha and
    scaling, and the other tensors PEFT saves (`extras`: biases, modules_to_save copies, the base
    weight copy of an adapted embedding), by PEFT key. `tensors` is {PEFT key: tensor} as in the
    file (empty when only the header was read)."""
    config: LoraConfig
    modules: dict[str, LoraModule]
    extras: dict[str, TensorInfo]
    tensors: dict[str, torch.Tensor]
    path: Path | None = None

    @property
    def has_data(self) -> bool:
        return bool(self.tensors)


def read_config(path: str | Path) -> tuple[dict[str, Any], LoraConfig]:
    """(raw adapter_config.json dict, LoraConfig) of a PEFT folder."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: not a folder (expected a PEFT adapter folder with "
                           f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        inner = path / "adapter"
        hint = (f" (a training run or checkpoint folder? its PEFT folder is {inner})"
                if (inner / CONFIG_NAME).is_file() else "")
        raise AdapterError(f"{path}: missing {CONFIG_NAME}{hint}")
    raw = read_json(config_file, AdapterError)
    return raw, LoraConfig.from_dict(raw, source=str(config_file))


def adapter_folder(path: str | Path) -> Path:
    """`path`, or the PEFT folder inside it when `path` is a `lorafleet train` output or one of
    its checkpoints (`OUT/`, `OUT/checkpoints/step-N/`: the adapter is their `adapter/`), so a
    checkpoint folder can be named as TRL users name theirs (`checkpoint-N/`)."""
    path = Path(path)
    inner = path / "adapter"
    if not (path / CONFIG_NAME).is_file() and (inner / CONFIG_NAME).is_file():
        return inner
    return path


def weights_file(path: str | Path) -> Path:
    """The safetensors file of a PEFT folder (a pickled one is refused with how to convert it)."""
    path = Path(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise AdapterError(
                f"{path}: found {pickled} but no {WEIGHTS_NAME}; lorafleet loads safetensors "
                "only (pickled weights can run arbitrary code when loaded). Convert it once in a "
                "trusted environment, e.g. PeftModel.from_pretrained(...).save_pretrained(dir, "
                "safe_serialization=True)")
        raise AdapterError(f"{path}: missing {WEIGHTS_NAME}")
    return weights


def read_header(weights: str | Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of a safetensors file, without reading any tensor data: the
    format's 8-byte little-endian header length, then that many bytes of JSON
    {name: {"dtype", "shape", "data_offsets"}} (a registry reads thousands of these, and
    opening each file with safetensors maps the whole of it). A header whose offsets pass the
    end of the file (a truncated file) is refused here."""
    try:
        with open(weights, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            length = int.from_bytes(handle.read(8), "little")
            if not 2 <= length <= min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"header length {length} does not fit a {size}-byte file")
            header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        infos, data_bytes = {}, size - 8 - length
        for key, entry in header.items():
            shape, (begin, end) = tuple(int(n) for n in entry["shape"]), entry["data_offsets"]
            if not 0 <= begin <= end <= data_bytes:
                raise ValueError(f"tensor {key!r} lies past the end of the file (truncated?)")
            infos[key] = TensorInfo(shape, str(entry["dtype"]), int(begin), int(end - begin))
        return infos
    except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{weights}: not a readable safetensors file ({exc})") from None


def read_tensors(weights: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (memory-mapped by safetensors, then copied)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{weights}: not a readable safetensors file ({exc})") from None


def read_arrays(weights: str | Path) -> dict[str, tuple[np.ndarray, str]]:
    """Every tensor of a safetensors file as (numpy array, dtype name), bf16 as its bits in
    uint16 (numpy has no bf16), read with one read call and no torch op. The adapter loader
    thread reads with it: torch ops there would compete with the step's matmuls for torch's
    intra-op threads (on a busy CPU, hundreds of small parallel ops took seconds)."""
    header = read_header(weights)
    try:
        with open(weights, "rb") as handle:
            handle.seek(8 + int.from_bytes(handle.read(8), "little"))
            data = np.fromfile(handle, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{weights}: not a readable safetensors file ({exc})") from None
    arrays = {}
    for key, info in header.items():
        storage = NUMPY_STORAGE.get(info.dtype)
        if storage is None:
            raise AdapterError(f"{weights}: tensor {key!r} has dtype {info.dtype}; adapter "
                               f"weights must be F32, F16, BF16 or F64 (no silent cast)")
        if info.nbytes != math.prod(info.shape) * np.dtype(storage).itemsize:
            raise AdapterError(f"{weights}: tensor {key!r}: {info.nbytes} bytes for shape "
                               f"{list(info.shape)} of {info.dtype}")
        block = data[info.offset:info.offset + info.nbytes]
        arrays[key] = (block.view(storage).reshape(info.shape), info.dtype)
    return arrays


def check_arrays(arrays: dict[str, tuple[np.ndarray, str]], source: str) -> None:
    """`check_tensors` for `read_arrays`' output: finite values only, naming the key."""
    for key, (array, dtype) in arrays.items():
        # bf16 bits: all-ones exponent is Inf or NaN.
        bad = ((array & 0x7F80) == 0x7F80).any() if dtype == "BF16" else \
            not np.isfinite(array).all()
        if bad:
            raise AdapterError(f"{source}: tensor {key!r} holds NaN or Inf values")


def check_tensors(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse tensors that are not floating point or hold NaN/Inf, naming the key: one such
    weight would make every output of the adapter NaN (and fail the batch it runs in). The
    scan runs in numpy on the tensors' memory (one thread, see read_arrays)."""
    names = {v: k for k, v in FLOAT_DTYPES.items()}
    arrays = {}
    for key, tensor in tensors.items():
        if tensor.dtype not in names:
            raise AdapterError(f"{source}: tensor {key!r} has dtype "
                               f"{str(tensor.dtype).removeprefix('torch.')}; adapter weights must "
                               f"be float32, float16, bfloat16 or float64")
        cpu = tensor.detach().cpu()
        arrays[key] = ((cpu.view(torch.int16) if cpu.dtype == torch.bfloat16 else cpu).numpy(),
                       names[cpu.dtype])
    check_arrays(arrays, source)


def parse_adapter(config: LoraConfig, tensors: dict[str, torch.Tensor | TensorInfo],
                  source: str = "adapter", path: Path | None = None) -> PeftAdapter:
    """Group PEFT-keyed tensors (or their header entries) by module and check each module
    against the config: both halves present, A [r, *] and B [*, r] with r > 0 equal to the
    config's rank for that module (`r` / `rank_pattern`), a float dtype."""
    pairs: dict[str, dict[str, Any]] = {}
    embedding_modules: set[str] = set()
    extras: dict[str, TensorInfo] = {}
    for key, tensor in tensors.items():
        info = tensor if isinstance(tensor, TensorInfo) else TensorInfo(
            tuple(tensor.shape), _dtype_name(tensor.dtype))
        if info.dtype not in FLOAT_DTYPES:
            raise AdapterError(f"{source}: tensor {key!r} has dtype {info.dtype}; adapter "
                               f"weights must be F32, F16, BF16 or F64 (no silent cast)")
        if not key.startswith(PREFIX):
            raise AdapterError(f"{source}: adapter key {key!r}: expected PEFT's prefix {PREFIX!r}")
        module, _, tail = key[len(PREFIX):].rpartition(".lora_")
        part = _PARTS.get(tail)
        if part is None:
            extras[key] = info
            continue
        pairs.setdefault(module, {})[part[0]] = (key, info, tensor)
        if part[1]:
            embedding_modules.add(module)
    modules = {}
    for module in sorted(pairs):
        pair, key = pairs[module], PREFIX + module
        magnitude = pair.pop("M", None)
        if magnitude is not None and not pair:
            raise AdapterError(f"{source}: {key}.lora_magnitude_vector without lora_A / lora_B")
        if (magnitude is not None) != config.use_dora:
            raise ConfigError(
                f"{source}: module {module!r}: use_dora={config.use_dora} in the config but the "
                f"file {'has' if magnitude is not None else 'lacks'} its "
                f"{key}.lora_magnitude_vector (DoRA adapters carry one per module)")
        if set(pair) != {"A", "B"}:
            (present,) = pair
            missing = pair[present][0].replace(f"lora_{present}", f"lora_{'AB'[present == 'A']}")
            raise AdapterError(f"{source}: the file lacks 1 tensors of module {module!r}: "
                               f"{missing!r} (lora_A and lora_B come in pairs)")
        (_, a_info, a), (_, b_info, b) = pair["A"], pair["B"]
        if len(a_info.shape) != 2 or len(b_info.shape) != 2:
            raise ShapeError(f"{source}: {key}: lora_A and lora_B must be 2-D, found "
                             f"{list(a_info.shape)} and {list(b_info.shape)}")
        rank, alpha = config.rank_and_alpha(module)
        if a_info.shape[0] != b_info.shape[1] or a_info.shape[0] != rank:
            raise ShapeError(f"{source}: {key}: expected rank {rank} from the config (r / "
                             f"rank_pattern), found lora_A {list(a_info.shape)} and lora_B "
                             f"{list(b_info.shape)}" + (" (rank 0: an empty adapter)"
                                                        if 0 in (a_info.shape[0], b_info.shape[1])
                                                        else ""))
        tensors_given = not isinstance(a, TensorInfo)
        m_shape = None
        if magnitude is not None:
            m_shape = magnitude[1].shape
            if m_shape != (b_info.shape[0],):
                raise ShapeError(f"{source}: {key}.lora_magnitude_vector: expected shape "
                                 f"[{b_info.shape[0]}] (one per output), found {list(m_shape)}")
        modules[module] = LoraModule(
            module, rank, alpha, config.scaling(rank, alpha), a_info.shape, b_info.shape,
            module in embedding_modules, a if tensors_given else None,
            b if tensors_given else None,
            magnitude[2] if magnitude is not None and tensors_given else None, m_shape)
    if not modules:
        raise AdapterError(f"{source}: no LoRA tensors (lora_A / lora_B) found")
    data = {k: t for k, t in tensors.items() if not isinstance(t, TensorInfo)}
    return PeftAdapter(config, modules, extras, data, path)


def load_peft(path: str | Path, header_only: bool = False) -> PeftAdapter:
    """Read and check a PEFT adapter folder. header_only: the config and the safetensors header
    (names, shapes, dtypes) only, no tensor data (registries); else every tensor is read and
    refused if it is not floating point or not finite."""
    path = Path(path)
    _, config = read_config(path)
    weights = weights_file(path)
    if header_only:
        return parse_adapter(config, read_header(weights), str(weights), path)
    tensors = read_tensors(weights)
    check_tensors(tensors, str(weights))
    return parse_adapter(config, tensors, str(weights), path)


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a PEFT adapter folder -> (adapter_config dict, {PEFT key: tensor}), checked as
    `load_peft` does (config fields, float and finite tensors, ranks)."""
    raw, _ = read_config(path)
    return raw, load_peft(path).tensors


def _dtype_name(dtype: torch.dtype) -> str:
    names = {v: k for k, v in FLOAT_DTYPES.items()}
    return names.get(dtype, str(dtype).removeprefix("torch."))


def write_adapter(path: str | Path, config, tensors: dict[str, torch.Tensor]) -> Path:
    """Write a PEFT adapter folder. `config`: a LoraConfig or an adapter_config dict."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    data = config if isinstance(config, dict) else config.to_peft_dict()
    (path / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    # safetensors refuses views that share storage; each tensor gets its own contiguous copy.
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
              path / WEIGHTS_NAME, metadata={"format": "pt"})
    return path


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """A summary of a PEFT adapter folder from its config and safetensors header (no tensor
    data read): rank, alpha, targets, parameter count, size on disk."""
    path = Path(path)
    raw, config = read_config(path)
    weights = weights_file(path)
    header = read_header(weights)
    adapter = parse_adapter(config, header, str(weights), path)   # load_peft's header_only path
    return {
        "path": str(path),
        "peft_type": raw.get("peft_type"),
        "base_model_name_or_path": raw.get("base_model_name_or_path"),
        "r": raw.get("r"),
        "lora_alpha": raw.get("lora_alpha"),
        "use_rslora": bool(raw.get("use_rslora", False)),
        "use_dora": bool(raw.get("use_dora", False)),
        "rank_pattern": raw.get("rank_pattern") or {},
        "alpha_pattern": raw.get("alpha_pattern") or {},
        "target_modules": raw.get("target_modules"),
        "adapted_modules": len(adapter.modules),
        "module_types": sorted({name.split(".")[-1] for name in adapter.modules}),
        "ranks": sorted({m.rank for m in adapter.modules.values()}),
        "bias": raw.get("bias", "none"),
        "modules_to_save": raw.get("modules_to_save"),
        "parameters": sum(math.prod(t.shape) for t in header.values()),
        "dtypes": sorted({str(FLOAT_DTYPES[t.dtype]).removeprefix("torch.")
                          for t in header.values()}),
        "size_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
    }
