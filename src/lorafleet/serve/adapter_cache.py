"""The adapter cache: the pool tier. Adapters the running batch needs are copied into pool pages,
reference-counted while requests use them, and evicted least recently used when the pool needs
pages (S-LoRA sec. 5.2).

Registered adapters are specs only (adapter_registry.py: layout, no weights). Making one resident
needs its page copy on the host: an adapter registered from tensors keeps its copy; one backed by
a file is read by the loader thread (adapter_loader.py) when a queued request asks for it
(`pin` / `prefetch` return False meanwhile, so the scheduler runs other requests), and the copy
arrives through `poll()`, which the engine calls at the start of every step. Everything here
runs on the engine thread; only the read runs on the loader's.

Prefetch (`prefetch`) starts the read of a queued request's adapter, and once its copy is there
writes it into free pages before the request's admission (never evicting, never pinning).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import torch

from lorafleet.errors import AdapterError, EngineError
from lorafleet.lora.config import LoraConfig
from lorafleet.lora.peft_format import check_tensors, parse_adapter

from .adapter_loader import AdapterLoader, HostCache
from .adapter_registry import AdapterSpec, BaseLayout, ModuleSlice, adapter_pages, build_spec
from .page_copy import PageCopier
from .pool import ADAPTER, PagePool

__all__ = ["AdapterCache", "HostAdapter", "ModuleSlice", "build_host_adapter"]

log = logging.getLogger(__name__)

# Adapters read ahead of their admission at once (loading or staged): bounds the host memory
# that copies on their way into the pool take, whatever the queue holds.
LOAD_AHEAD = 8


class HostAdapter:
    """An adapter registered from tensors in memory: its spec and its only page copy."""

    def __init__(self, spec: AdapterSpec, pages: torch.Tensor):
        self.spec, self.pages = spec, pages
        self.name, self.num_pages, self.max_rank = spec.name, spec.num_pages, spec.max_rank

    @property
    def modules(self) -> dict[str, ModuleSlice]:
        return self.spec.modules


def build_host_adapter(name: str, config: dict | LoraConfig, tensors: dict[str, torch.Tensor],
                       targets: dict[str, tuple[int, int]], page_size: int, max_rank: int,
                       dtype: torch.dtype, exclude: frozenset[str] = frozenset()) -> HostAdapter:
    """Check PEFT-keyed tensors against the base and lay them out in pages (AdapterError naming
    the key or module when they do not fit)."""
    if not isinstance(config, LoraConfig):
        config = LoraConfig.from_dict(config, source=f"adapter {name!r} config")
    check_tensors(tensors, f"adapter {name!r}")
    adapter = parse_adapter(config, tensors, f"adapter {name!r}")
    spec = build_spec(name, adapter, BaseLayout(targets, page_size, max_rank, exclude))
    return HostAdapter(spec, adapter_pages(spec, adapter, dtype))


class AdapterCache:
    """Registered adapters (specs), the host tier, and the resident ones (pool pages, LRU).

    `write_pages(page_ids, pages [n, H])` copies into the runner's pool tensor; `copier`
    (page_copy.py) issues it: at once on CPU, on a side stream ordered by events on CUDA."""

    def __init__(self, pool: PagePool, write_pages: Callable[[list[int], torch.Tensor], None],
                 loader: AdapterLoader | None = None, host_cache: HostCache | None = None,
                 copier: PageCopier | None = None):
        self.pool, self.write_pages = pool, write_pages
        self.copier = copier or PageCopier()
        self.loader = loader or AdapterLoader(torch.float32)
        self.host_cache = host_cache or HostCache(None, None, LOAD_AHEAD)
        self.specs: dict[str, AdapterSpec] = {}
        self.host = self.specs          # lora_batch reads `host[name].modules` of resident ones
        self.in_memory: dict[str, torch.Tensor] = {}   # registered from tensors: no file
        self.loading: dict[str, int] = {}               # name -> version being read
        self.wanted: set[str] = set()      # asked for since the last poll (keeps staged copies)
        self.resident: OrderedDict[str, list[int]] = OrderedDict()   # LRU first
        self.load_id: dict[str, int] = {}      # changes on every (re)load: keys runner caches
        self.refcount: dict[str, int] = {}
        self.hits = self.misses = self.evictions = self.prefetches = 0
        self.loads = self.load_failures = self.host_misses = 0
        self.load_seconds = 0.0
        self._loads = self._versions = 0

    # ---- registry ----------------------------------------------------------------------------

    def register(self, adapter: AdapterSpec | HostAdapter, pages: torch.Tensor | None = None,
                 ) -> None:
        """Register a spec (its file is read when needed) or, with `pages` (or a HostAdapter),
        an adapter whose page copy stays in memory. Registering a name again replaces it."""
        if isinstance(adapter, HostAdapter):
            adapter, pages = adapter.spec, adapter.pages
        if adapter.num_pages > self.pool.num_pages:
            raise AdapterError(f"adapter {adapter.name!r} needs {adapter.num_pages} pages, the "
                               f"pool has {self.pool.num_pages}")
        if pages is None and adapter.path is None:
            raise AdapterError(f"adapter {adapter.name!r} has neither a file nor tensors")
        if adapter.name in self.specs:
            self.unregister(adapter.name)
        self._versions += 1
        adapter.version = self._versions
        self.specs[adapter.name] = adapter
        if pages is not None:
            self.in_memory[adapter.name] = self.copier.stage(pages)   # pinned once on CUDA

    def unregister(self, name: str) -> None:
        if self.refcount.get(name, 0):
            raise EngineError(f"adapter {name!r} is used by {self.refcount[name]} running "
                              f"request(s); abort them or wait before unregistering it")
        if name in self.resident:
            self._evict(name)
        self.specs.pop(name, None)
        self.in_memory.pop(name, None)
        self.loading.pop(name, None)       # a read in flight is dropped when it arrives
        self.host_cache.discard(name)

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    def names(self) -> list[str]:
        return sorted(self.specs)

    # ---- the host tier -----------------------------------------------------------------------

    def _host_pages(self, name: str) -> tuple[torch.Tensor | None, bool]:
        if name in self.in_memory:
            return self.in_memory[name], False
        return self.host_cache.get(name, self.specs[name].version)

    def ready(self, name: str) -> bool:
        """Resident, or its page copy is on the host (admission will not wait for a read)."""
        return name in self.resident or self._host_pages(name)[0] is not None

    def request(self, name: str) -> None:
        """Start reading `name` on the loader thread unless it is there, being read, or the
        read-ahead window (LOAD_AHEAD) is full (the scheduler asks again next step)."""
        self.wanted.add(name)
        if name in self.loading or self.ready(name):
            return
        if len(self.loading) + len(self.host_cache.staged) >= LOAD_AHEAD:
            # Make room by dropping a staged copy nothing asked for since the last poll (its
            # requests were aborted or failed, or wait far back): it is read again if needed.
            stale = next((n for n in self.host_cache.staged if n not in self.wanted), None)
            if stale is None:
                return
            del self.host_cache.staged[stale]
            self.host_cache.dropped += 1
        spec = self.specs[name]
        self.loading[name] = spec.version
        self.host_misses += 1
        self.loader.submit(spec)

    def poll(self) -> list[tuple[str, str]]:
        """Take the loader's finished reads (engine thread). Returns (name, error) for each
        adapter whose file could not be loaded: the engine fails its queued requests."""
        self.wanted.clear()
        self.copier.collect()
        failures = []
        for result in self.loader.completed():
            if self.loading.get(result.name) == result.version:
                del self.loading[result.name]
            spec = self.specs.get(result.name)
            if spec is None or spec.version != result.version:
                continue                   # unregistered or replaced meanwhile
            if result.error is not None:
                self.load_failures += 1
                failures.append((result.name, result.error))
                continue
            self.loads += 1
            self.load_seconds += result.seconds
            log.debug("adapter %r read in %.3f s", result.name, result.seconds)
            self.host_cache.stage(result.name, result.version, result.pages)
        return failures

    # ---- residency ---------------------------------------------------------------------------

    def pin(self, name: str, reserve: int = 0) -> bool:
        """Make `name` resident and take a reference, keeping `reserve` pages free besides
        (the caller's KV pages). False, with nothing changed, if that is impossible now (no
        pages, or its copy is still being read: the read is started)."""
        self.wanted.add(name)
        if name in self.resident:
            self.hits += 1
        else:
            if not self._load(name, reserve):
                return False
            self.misses += 1
        self.resident.move_to_end(name)
        self.refcount[name] = self.refcount.get(name, 0) + 1
        self.copier.before_use(name)      # the coming step's reads wait for the copy (CUDA)
        return True

    def unpin(self, name: str) -> None:
        self.refcount[name] -= 1
        if not self.refcount[name]:
            del self.refcount[name]

    def prefetch(self, name: str) -> bool:
        if name in self.resident or name not in self.specs:
            return name in self.resident
        self.wanted.add(name)
        pages, _ = self._host_pages(name)
        if pages is None:
            self.request(name)
            return False
        if not self.pool.can_alloc(self.specs[name].num_pages):
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
        pages, from_cache = self._host_pages(name)
        if pages is None:
            self.request(name)
            return False
        shortage = pages.shape[0] + reserve - self.pool.num_free
        if shortage > 0:
            if shortage > self.evictable_pages():
                return False
            self.reclaim(shortage)
        page_ids = self.pool.alloc(pages.shape[0], ADAPTER)
        self.copier.copy(name, page_ids, pages, self.write_pages)
        if name not in self.in_memory:
            self.host_cache.entered_pool(name, from_cache)
        self.resident[name] = page_ids
        self._loads += 1
        self.load_id[name] = self._loads
        return True

    def _evict(self, name: str) -> int:
        page_ids = self.resident.pop(name)
        self.load_id.pop(name, None)
        self.copier.freed(name)
        self.pool.free(page_ids)
        self.evictions += 1
        return len(page_ids)

    def stats(self) -> dict:
        return {"adapters_registered": len(self.specs), "adapters_resident": len(self.resident),
                "adapters_in_use": len(self.refcount), "cache_hits": self.hits,
                "cache_misses": self.misses, "cache_evictions": self.evictions,
                "cache_prefetches": self.prefetches, "adapters_loading": len(self.loading),
                "adapter_loads": self.loads, "adapter_load_failures": self.load_failures,
                "adapter_load_seconds_sum": self.load_seconds,
                "adapter_load_seconds_count": self.loads,
                "host_cache_hits": self.host_cache.hits, "host_cache_misses": self.host_misses,
                "host_cache_adapters": len(self.host_cache.cached),
                "host_cache_bytes": self.host_cache.num_bytes,
                "host_staged_adapters": len(self.host_cache.staged)}
