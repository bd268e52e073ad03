"""The adapter cache: every registered adapter has a host copy; those the running batch needs are
copied into pool pages on demand, reference-counted while requests use them, and evicted least
recently used when the pool needs pages (S-LoRA sec. 5.2).

Host copy layout. For each target module an adapter stores the rank rows of `A [r, in]` and of
`B^T [r, out]`; each row takes `ceil(dim / H)` pages, zero-padded (pool.py). The host copy is
already in page form, one `[num_pages, H]` tensor, so loading is one indexed copy into the pool.
Ranks are the adapter's own (per module, `rank_pattern` included): nothing is padded to a
maximum rank.

Prefetch (`prefetch`) loads a queued request's adapter into free pages before its admission. On
CPU the copy is synchronous, done by the scheduler at the end of `schedule()` before the step
runs; on a GPU it would be a copy on a side stream overlapping the step.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lorafleet.errors import AdapterError, EngineError, ShapeError

from .kv_cache import cdiv
from .pool import ADAPTER, PagePool

log = logging.getLogger(__name__)

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])"
                  r"(?:\.[^.]+)?\.weight$")


def read_peft_folder(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, tensors) of a PEFT folder. Uses the adapters stage's
    reader when it is there; safetensors only, never pickles."""
    try:
        from lorafleet.lora.peft_format import read_adapter
    except ImportError:
        read_adapter = None
    if read_adapter is not None:
        config, tensors = read_adapter(path)
        return (config if isinstance(config, dict) else vars(config)), tensors
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    for needed in (config_file, weights_file):
        if not needed.is_file():
            raise AdapterError(f"adapter folder {path}: missing {needed.name}")
    return json.loads(config_file.read_text()), load_file(str(weights_file))


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name when the name
    ends with it (on a '.' boundary), as a regular expression."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


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


@dataclass
class HostAdapter:
    name: str
    modules: dict[str, ModuleSlice]     # module name -> slice (sorted by module name)
    pages: torch.Tensor                 # [num_pages, H] host copy in page form
    max_rank: int

    @property
    def num_pages(self) -> int:
        return self.pages.shape[0]


def build_host_adapter(name: str, config: dict, tensors: dict[str, torch.Tensor],
                       targets: dict[str, tuple[int, int]], page_size: int, max_rank: int,
                       dtype: torch.dtype, exclude: frozenset[str] = frozenset()) -> HostAdapter:
    """Validate a PEFT adapter against the base model and lay it out in pages.

    targets: module name -> (in_features, out_features) of every projection the engine can
    adapt. exclude: target modules whose LoRA the engine does not serve (the engine passes the
    output head: it computes lm_head only for the rows it samples from, so a per-row LoRA on it
    would meet misaligned rows). Raises AdapterError (naming the key) when the adapter does not
    fit."""
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise AdapterError(f"adapter {name!r}: DoRA adapters are not supported by the engine")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        # Before the key check: peft saves an adapted lm_head's base weight too
        # (`lm_head.base_layer.weight`, save_embedding_layers), which is not a LoRA key.
        local_key = key.removeprefix("base_model.model.")
        excluded = next((m for m in sorted(exclude) if local_key.startswith(m + ".")), None)
        if excluded is not None:
            raise AdapterError(f"adapter {name!r}: module {excluded!r}: LoRA on {excluded} is "
                               f"not served by the engine; merge it into the base (lorafleet "
                               f"merge) or train without {excluded}")
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"adapter {name!r}: tensor {key!r} is not a LoRA A/B weight "
                               f"(embedding LoRA, biases and modules_to_save are not served)")
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    if not pairs:
        raise AdapterError(f"adapter {name!r} has no LoRA tensors")
    use_rslora, alpha = bool(config.get("use_rslora", False)), config.get("lora_alpha", 8)
    modules, rows, next_page, adapter_rank = {}, [], 0, 0
    for module in sorted(pairs):
        pair = pairs[module]
        if module not in targets:
            sample = ", ".join(sorted(targets)[:4])
            raise AdapterError(f"adapter {name!r}: module {module!r} is not a projection of the "
                               f"base model (e.g. {sample})")
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: module {module!r} lacks lora_"
                               f"{'B' if 'A' in pair else 'A'}")
        a, b = pair["A"], pair["B"]
        in_features, out_features = targets[module]
        rank = a.shape[0]
        if a.shape != (rank, in_features) or b.shape != (out_features, rank):
            raise ShapeError(f"adapter {name!r}, module {module!r}: expected lora_A "
                             f"[r, {in_features}] and lora_B [{out_features}, r], found "
                             f"{list(a.shape)} and {list(b.shape)}")
        if rank > max_rank:
            raise AdapterError(f"adapter {name!r}, module {module!r}: rank {rank} is larger "
                               f"than the engine's max_lora_rank {max_rank}")
        module_alpha = _pattern_value(config.get("alpha_pattern"), module, alpha)
        scaling = module_alpha / (math.sqrt(rank) if use_rslora else rank)
        a_ppr, b_ppr = cdiv(in_features, page_size), cdiv(out_features, page_size)
        modules[module] = ModuleSlice(rank, in_features, out_features, float(scaling),
                                      next_page, a_ppr, next_page + rank * a_ppr, b_ppr)
        next_page += rank * (a_ppr + b_ppr)
        rows += [(a, a_ppr), (b.t(), b_ppr)]
        adapter_rank = max(adapter_rank, rank)
    pages = torch.zeros(next_page, page_size, dtype=dtype)
    start = 0
    for matrix, pages_per_row in rows:   # matrix [r, dim] -> r * pages_per_row pages
        r, dim = matrix.shape
        block = pages[start:start + r * pages_per_row].view(r, pages_per_row * page_size)
        block[:, :dim] = matrix.to(dtype)
        start += r * pages_per_row
    return HostAdapter(name, modules, pages, adapter_rank)


class AdapterCache:
    """Registered adapters (host) and the resident ones (pool pages), with LRU eviction.

    `write_pages(page_ids, pages [n, H])` copies into the runner's pool tensor."""

    def __init__(self, pool: PagePool, write_pages: Callable[[list[int], torch.Tensor], None]):
        self.pool, self.write_pages = pool, write_pages
        self.host: dict[str, HostAdapter] = {}
        self.resident: OrderedDict[str, list[int]] = OrderedDict()   # LRU first
        self.load_id: dict[str, int] = {}      # changes on every (re)load: keys runner caches
        self.refcount: dict[str, int] = {}
        self.hits = self.misses = self.evictions = self.prefetches = 0
        self._loads = 0

    # ---- registry ----------------------------------------------------------------------------

    def register(self, adapter: HostAdapter) -> None:
        if adapter.num_pages > self.pool.num_pages:
            raise AdapterError(f"adapter {adapter.name!r} needs {adapter.num_pages} pages, the "
                               f"pool has {self.pool.num_pages}")
        if adapter.name in self.host:
            self.unregister(adapter.name)
        self.host[adapter.name] = adapter

    def unregister(self, name: str) -> None:
        if self.refcount.get(name, 0):
            raise EngineError(f"adapter {name!r} is used by {self.refcount[name]} running "
                              f"request(s); abort them or wait before unregistering it")
        if name in self.resident:
            self._evict(name)
        self.host.pop(name, None)

    def __contains__(self, name: str) -> bool:
        return name in self.host

    def names(self) -> list[str]:
        return sorted(self.host)

    # ---- residency ---------------------------------------------------------------------------

    def pin(self, name: str, reserve: int = 0) -> bool:
        """Make `name` resident and take a reference, keeping `reserve` pages free besides
        (the caller's KV pages). False, with nothing changed, if that is impossible now."""
        if name in self.resident:
            self.hits += 1
        else:
            if not self._load(name, reserve):
                return False
            self.misses += 1
        self.resident.move_to_end(name)
        self.refcount[name] = self.refcount.get(name, 0) + 1
        return True

    def unpin(self, name: str) -> None:
        self.refcount[name] -= 1
        if not self.refcount[name]:
            del self.refcount[name]

    def prefetch(self, name: str) -> bool:
        if name in self.resident or name not in self.host:
            return name in self.resident
        if not self.pool.can_alloc(self.host[name].num_pages):
            return False
        self._load(name, 0)
        self.prefetches += 1
        return True

    def reclaim(self, num_pages: int) -> int:
        """Evict unreferenced adapters, least recently used first, until `num_pages` pages are
        freed or none is left to evict. Returns the pages freed."""
        freed = 0
        for name in [n for n in self.resident if n not in self.refcount]:
            if freed >= num_pages:
                break
            freed += self._evict(name)
        return freed

    def evictable_pages(self) -> int:
        return sum(len(p) for n, p in self.resident.items() if n not in self.refcount)

    def _load(self, name: str, reserve: int) -> bool:
        adapter = self.host[name]
        shortage = adapter.num_pages + reserve - self.pool.num_free
        if shortage > 0:
            if shortage > self.evictable_pages():
                return False
            self.reclaim(shortage)
        page_ids = self.pool.alloc(adapter.num_pages, ADAPTER)
        self.write_pages(page_ids, adapter.pages)
        self.resident[name] = page_ids
        self._loads += 1
        self.load_id[name] = self._loads
        return True

    def _evict(self, name: str) -> int:
        page_ids = self.resident.pop(name)
        self.load_id.pop(name, None)
        self.pool.free(page_ids)
        self.evictions += 1
        return len(page_ids)

    def stats(self) -> dict:
        return {"adapters_registered": len(self.host), "adapters_resident": len(self.resident),
                "adapters_in_use": len(self.refcount), "cache_hits": self.hits,
                "cache_misses": self.misses, "cache_evictions": self.evictions,
                "cache_prefetches": self.prefetches}
