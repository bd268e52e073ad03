"""What the engine knows about an adapter it has not loaded: its layout in pages, from the config
and the safetensors header alone (no tensor data), so thousands can be registered in seconds and
a few KB each. Loading the weights (adapter_loader.py) and making them resident
(adapter_cache.py) come later, when a request needs them.

Page layout (S-LoRA sec. 5.1, pool.py). For each target module an adapter stores the rank rows
of `A [r, in]` and of `B^T [r, out]`; each row takes `ceil(dim / H)` pages, zero-padded, modules
in sorted name order. Ranks are the adapter's own (per module, `rank_pattern` included): nothing
is padded to a maximum rank.
"""
from __future__ import annotations

import functools
import logging
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lorafleet.adapters.store import confine
from lorafleet.errors import AdapterError, ConfigError, ShapeError
from lorafleet.lora.init import changes_base
from lorafleet.lora.peft_format import (PREFIX, PeftAdapter, TensorInfo, check_arrays, load_peft,
                                        parse_adapter, read_arrays, read_config, weights_file)

from .kv_cache import cdiv

log = logging.getLogger(__name__)


@dataclass
class ModuleSlice:
    """Where one target module's low-rank pair sits in an adapter's pages."""
    rank: int
    in_features: int
    out_features: int
    scaling: float
    a_page: int          # first page of A's rows (relative to the adapter's own pages)
    a_pages_per_row: int
    b_page: int          # first page of B^T's rows
    b_pages_per_row: int
    m_page: int = -1     # DoRA: first page of the magnitude m [out] (b_pages_per_row pages); -1: none


@dataclass
class BaseLayout:
    """What an adapter is checked against: the base model's adaptable projections
    (name -> (in_features, out_features)), the page size H, the engine's max rank, and the
    projections whose LoRA the engine does not serve (the output head: lm_head is computed only
    for the rows that sample, so a per-row LoRA on it would meet misaligned rows)."""
    targets: dict[str, tuple[int, int]]
    page_size: int
    max_rank: int
    exclude: frozenset[str] = frozenset()
    base_name: str | None = None     # the served base's folder: adapters naming another warn
    # Interned module-name tuples: adapters with the same target set share one.
    _module_sets: dict[tuple[str, ...], tuple[str, ...]] = field(default_factory=dict, repr=False)

    def module_set(self, names: tuple[str, ...]) -> tuple[str, ...]:
        return self._module_sets.setdefault(names, names)


class AdapterSpec:
    """A registered adapter without its weights: module names, ranks and scalings in compact
    arrays (a rank-16 all-linear Llama-8B adapter: 224 modules, ~3 KB), the pages it takes, and
    where its folder is (and the store `root` it must stay inside). `modules` builds the ModuleSlice view on demand (resident adapters only).
    `version` changes whenever the name is registered again, so a load started for an older
    registration is recognised and dropped."""

    __slots__ = ("name", "path", "root", "layout", "module_names", "ranks", "scalings",
                 "num_pages", "max_rank", "version", "dora")

    def __init__(self, name: str, path: Path | None, layout: BaseLayout,
                 module_names: tuple[str, ...], ranks: array, scalings: array, version: int = 0,
                 dora: bool = False):
        self.name, self.path, self.root, self.layout = name, path, None, layout
        self.module_names, self.ranks, self.scalings = module_names, ranks, scalings
        self.dora = dora     # DoRA: one more row of pages per module, its magnitude m [out]
        self.num_pages = sum(r * cdiv(layout.targets[m][0], layout.page_size)
                             + (r + dora) * cdiv(layout.targets[m][1], layout.page_size)
                             for m, r in zip(module_names, ranks))
        self.max_rank = max(ranks)
        self.version = version

    @property
    def modules(self) -> dict[str, ModuleSlice]:
        page_size, out, next_page = self.layout.page_size, {}, 0
        for module, rank, scaling in zip(self.module_names, self.ranks, self.scalings):
            fan_in, fan_out = self.layout.targets[module]
            a_ppr, b_ppr = cdiv(fan_in, page_size), cdiv(fan_out, page_size)
            b_page = next_page + rank * a_ppr
            out[module] = ModuleSlice(rank, fan_in, fan_out, scaling, next_page, a_ppr,
                                      b_page, b_ppr, b_page + rank * b_ppr if self.dora else -1)
            next_page += rank * (a_ppr + b_ppr) + (b_ppr if self.dora else 0)
        return out


@functools.lru_cache(maxsize=1024)   # once per adapter and base, not on every (re)load
def warn_other_base(name: str, trained_on: str, served: str) -> None:
    """A base of the same shapes but other weights loads fine and answers badly: say so. Names
    compare by their last path part, so a hub id (org/model) matches a local folder `model`."""
    if Path(trained_on).name.lower() != Path(served).name.lower():
        log.warning("adapter %r was trained on %r, but the served base is %r: its outputs may "
                    "be wrong if the weights differ", name, trained_on, served)


def build_spec(name: str, adapter: PeftAdapter, layout: BaseLayout) -> AdapterSpec:
    """Check a parsed adapter (header-only or with data) against the base and lay it out.
    Raises AdapterError / ShapeError naming the adapter and the module."""
    names = sorted(adapter.modules)
    if layout.base_name and adapter.config.base_model_name_or_path:
        warn_other_base(name, adapter.config.base_model_name_or_path, layout.base_name)
    init = adapter.config.init_lora_weights
    if changes_base(init):     # trained over a residual base the engine does not hold
        raise AdapterError(f"adapter {name!r}: init_lora_weights={init!r}: it was trained over "
                           f"a rewritten base; save it converted to a plain LoRA over the "
                           f"original base (save_adapter(..., convert_to_lora=True), or PEFT's "
                           f"path_initial_model_for_weight_conversion)")
    # Before anything else: peft saves an adapted lm_head's base weight too
    # (`lm_head.base_layer.weight`), which would read as an unsupported extra tensor.
    excluded = [m for m in names if m in layout.exclude] + [
        m for key in adapter.extras for m in sorted(layout.exclude)
        if key.removeprefix("base_model.model.").startswith(m + ".")]
    if excluded:
        module = excluded[0]
        raise AdapterError(f"adapter {name!r}: module {module!r}: LoRA on {module} is not "
                           f"served by the engine; merge it into the base (lorafleet merge) "
                           f"or train without {module}")
    for key in adapter.extras:
        raise AdapterError(f"adapter {name!r}: tensor {key!r} is not a LoRA A/B weight "
                           f"(embedding LoRA, biases and modules_to_save are not served)")
    for module in names:
        lora = adapter.modules[module]
        if module not in layout.targets or lora.embedding:
            sample = ", ".join(sorted(layout.targets)[:4])
            raise AdapterError(f"adapter {name!r}: module {module!r} is not a projection of the "
                               f"base model (e.g. {sample})")
        fan_in, fan_out = layout.targets[module]
        if lora.a_shape != (lora.rank, fan_in) or lora.b_shape != (fan_out, lora.rank):
            raise ShapeError(f"adapter {name!r}, module {module!r}: expected lora_A "
                             f"[r, {fan_in}] and lora_B [{fan_out}, r], found "
                             f"{list(lora.a_shape)} and {list(lora.b_shape)}")
        if lora.rank > layout.max_rank:
            raise AdapterError(f"adapter {name!r}, module {module!r}: rank {lora.rank} is larger "
                               f"than the engine's max_lora_rank {layout.max_rank}")
    return AdapterSpec(name, adapter.path, layout, layout.module_set(tuple(names)),
                       array("I", (adapter.modules[m].rank for m in names)),
                       array("d", (adapter.modules[m].scaling for m in names)),
                       dora=adapter.config.use_dora)


def adapter_pages(spec: AdapterSpec, adapter: PeftAdapter, dtype: torch.dtype) -> torch.Tensor:
    """The adapter's weights in page form, `[spec.num_pages, H]` in `dtype`: what one indexed
    copy puts into the pool. `adapter` must hold the tensors and match `spec` (the file may have
    changed since it was registered: then AdapterError)."""
    if set(adapter.modules) != set(spec.module_names):
        raise AdapterError(f"adapter {spec.name!r}: its file changed since it was registered "
                           f"(modules differ); register it again")
    page_size = spec.layout.page_size
    pages = torch.zeros(spec.num_pages, page_size, dtype=dtype)
    for module, s in spec.modules.items():
        lora = adapter.modules[module]
        if (lora.A.shape != (s.rank, s.in_features) or lora.B.shape != (s.out_features, s.rank)
                or lora.scaling != s.scaling):
            raise AdapterError(f"adapter {spec.name!r}, module {module!r}: its files changed "
                               f"since it was registered (shapes or scaling differ); register "
                               f"it again")
        for matrix, first, pages_per_row in ((lora.A, s.a_page, s.a_pages_per_row),
                                             (lora.B.t(), s.b_page, s.b_pages_per_row)):
            r, dim = matrix.shape        # [r, dim] -> r * pages_per_row pages
            block = pages[first:first + r * pages_per_row].view(r, pages_per_row * page_size)
            block[:, :dim] = matrix.to(dtype)
        if s.m_page >= 0:    # DoRA's magnitude: one row like a row of B^T
            pages[s.m_page:s.m_page + s.b_pages_per_row].view(-1)[:s.out_features] = \
                lora.magnitude.to(dtype)
    return pages


def file_pages(spec: AdapterSpec, path: Path, dtype: torch.dtype) -> torch.Tensor:
    """What `adapter_pages` gives, read from the adapter's folder with numpy only (the loader
    thread's work: peft_format.read_arrays says why no torch op runs here). Checks the file
    again (finite floats, ranks as its config says) and that it still matches `spec`."""
    _, config = read_config(path)
    weights = weights_file(path)
    arrays = read_arrays(weights)
    check_arrays(arrays, str(weights))
    header = {key: TensorInfo(array.shape, name) for key, (array, name) in arrays.items()}
    adapter = parse_adapter(config, header, str(weights), path)
    if set(adapter.modules) != set(spec.module_names):
        raise AdapterError(f"adapter {spec.name!r}: its files changed since it was registered "
                           f"(modules differ); register it again")
    page_size = spec.layout.page_size
    pages = np.zeros((spec.num_pages, page_size), dtype=_STORAGE[dtype])
    for module, s in spec.modules.items():
        lora = adapter.modules[module]
        if (lora.a_shape != (s.rank, s.in_features) or lora.b_shape != (s.out_features, s.rank)
                or lora.scaling != s.scaling):
            raise AdapterError(f"adapter {spec.name!r}, module {module!r}: its files changed "
                               f"since it was registered (shapes or scaling differ); register "
                               f"it again")
        key = f"{PREFIX}{module}.lora_"
        a, b = arrays[key + "A.weight"], arrays[key + "B.weight"]
        for matrix, first, pages_per_row in ((_converted(*a, dtype), s.a_page, s.a_pages_per_row),
                                             (_converted(*b, dtype).T, s.b_page,
                                              s.b_pages_per_row)):
            r, dim = matrix.shape        # [r, dim] -> r * pages_per_row pages
            block = pages[first:first + r * pages_per_row].reshape(r, pages_per_row * page_size)
            block[:, :dim] = matrix
        if s.m_page >= 0:    # DoRA's magnitude: one row like a row of B^T
            pages[s.m_page:s.m_page + s.b_pages_per_row].reshape(-1)[:s.out_features] = \
                _converted(*arrays[key + "magnitude_vector"], dtype)
    tensor = torch.from_numpy(pages)
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


# numpy storage of each page dtype (bf16: its bits as uint16).
_STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
            torch.bfloat16: np.uint16}


def _converted(array: np.ndarray, name: str, dtype: torch.dtype) -> np.ndarray:
    """`array` (numpy storage of safetensors dtype `name`) in the numpy storage of `dtype`,
    rounding to bf16 to nearest even as torch does (values are finite: checked before)."""
    if dtype == torch.bfloat16:
        if name == "BF16":
            return array
        bits = array.astype(np.float32).view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    if name == "BF16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(_STORAGE[dtype], copy=False)


def read_spec(name: str, path: str | Path, layout: BaseLayout, root: Path | None = None,
              header_only: bool = True) -> AdapterSpec:
    """Read a PEFT folder (its config and safetensors header; every tensor too, checked, unless
    `header_only`) and check it against the base. root: the store it must stay inside."""
    path = Path(path)
    if root is not None:
        path = confine(path, root)
    try:
        spec = build_spec(name, load_peft(path, header_only=header_only), layout)
    except ConfigError as exc:           # a bad adapter_config.json is a bad adapter
        raise AdapterError(f"adapter {name!r}: {exc}") from None
    spec.root = root
    return spec
