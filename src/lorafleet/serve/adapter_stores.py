"""The adapter stores an engine serves from: folders of PEFT folders (`AdapterStore`), attached
once, whose adapters are registered lazily (config and safetensors header, no tensors) when
attached and, for folders added later, when a request first names them.

Composition, not a base class of the engine: `AdapterStores` holds the attached stores and
registers what it finds into the engine's `AdapterCache` under the engine's lock; the engine's
`register_store`, `resolve_adapter` and `resolvable_adapters` call it. File IO (reading a
config and header) runs without the lock, so a slow disk never stalls a step.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from lorafleet.adapters.store import AdapterStore, is_valid_name
from lorafleet.errors import AdapterError

from .adapter_cache import AdapterCache
from .adapter_registry import BaseLayout, read_spec

log = logging.getLogger(__name__)


class AdapterStores:
    def __init__(self, layout: BaseLayout, cache: AdapterCache, lock: threading.RLock):
        self.layout, self.cache, self.lock = layout, cache, lock
        self.stores: list[AdapterStore] = []      # attached, in attachment order

    def attach(self, store: AdapterStore | str | Path, lazy: bool = True,
               progress=None) -> list[str]:
        """Attach a store (or a folder of PEFT folders) and register its adapters (lazily:
        config and header only) unless a name is registered already. A folder that is not a
        valid adapter is skipped with a warning. Returns the store's registered names.
        `progress(done, total)`: called before the first folder and after each one."""
        store = store if isinstance(store, AdapterStore) else AdapterStore(store)
        with self.lock:
            if all(Path(s.root).resolve() != Path(store.root).resolve() for s in self.stores):
                self.stores.append(store)
        names, found = [], store.names()
        for done, name in enumerate(found):
            if progress is not None:
                progress(done, len(found))
            if name in self.cache:        # already registered (an earlier call, --adapter)
                names.append(name)
                continue
            try:
                spec = read_spec(name, store.root / name, self.layout, store.root,
                                 header_only=lazy)
            except AdapterError as exc:
                log.warning("adapter store %s: skipping %r: %s", store.root, name, exc)
                continue
            with self.lock:
                self.cache.register(spec)
            names.append(name)
        if progress is not None:
            progress(len(found), len(found))
        return names

    def resolve(self, name: str) -> bool:
        """True if `name` is registered, or is a valid folder of an attached store and is now
        registered (config and header, no tensors; safe from any thread). False if there is no
        such adapter; AdapterError if the folder exists but is not a valid adapter for this
        base, or one of its files resolves outside the store."""
        with self.lock:
            if name in self.cache:
                return True
            stores = list(self.stores)
        if not is_valid_name(name):
            return False
        for store in stores:
            if name not in store:
                continue
            spec = read_spec(name, store.root / name, self.layout, store.root)
            with self.lock:
                if name not in self.cache:       # another thread may have resolved it first
                    self.cache.register(spec)
            return True
        return False

    def resolvable(self) -> list[str]:
        """Registered adapters and the valid-looking folders of attached stores (not checked
        until resolved), sorted."""
        with self.lock:
            names, stores = set(self.cache.names()), list(self.stores)
        for store in stores:
            names.update(store.names())
        return sorted(names)
