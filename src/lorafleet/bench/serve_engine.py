"""The engine a serving-benchmark run measures: built from EngineConfig fields (none = the
out-of-the-box defaults), adapters registered from a store (lazily where the engine can), and
what it resolved and counted, as JSON values."""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

from lorafleet.errors import ConfigError

from .workloads import adapter_name


def engine_config(overrides: dict):
    from lorafleet.serve import EngineConfig

    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"EngineConfig has no field(s) {unknown}")
    return EngineConfig(**overrides)


def describe_engine(engine) -> dict:
    """The configuration the engine resolved (dtype, pool size), as JSON values."""
    config = {k: (str(v) if not isinstance(v, (int, float, bool, str, type(None))) else v)
              for k, v in dataclasses.asdict(engine.config).items()}
    page_bytes = engine.runner.page_bytes
    return {"config": config, "dtype": str(engine.runner.dtype).removeprefix("torch."),
            "num_pages": engine.pool.num_pages, "page_bytes": page_bytes,
            "pool_bytes": engine.pool.num_pages * page_bytes,
            "kv_tokens": engine.pool.num_pages // engine.kv.layout.pages_per_block
            * engine.kv.layout.block_tokens}


def register(engine, store_dir: Path, num_adapters: int) -> tuple[list[str], str]:
    """Register the store's N adapters; lazily (headers only) where the engine can."""
    params = inspect.signature(engine.register_store).parameters
    if "lazy" in params:
        names = engine.register_store(store_dir, lazy=True)
        mode = "lazy"
    else:
        names = engine.register_store(store_dir)
        mode = "eager"
    expected = [adapter_name(i) for i in range(num_adapters)]
    if sorted(names) != expected:
        raise ConfigError(f"store {store_dir} registered {len(names)} adapters, expected "
                           f"{num_adapters}")
    return expected, mode


def adapter_counters(stats: dict) -> dict:
    """Loads, evictions and hit rate from Engine.stats(), whichever names this engine uses."""
    def first(*keys):
        return next((stats[k] for k in keys if k in stats), None)

    hits, misses = first("adapter_hits", "cache_hits"), first("adapter_misses", "cache_misses")
    loads = first("adapter_loads", "pool_loads", "loads")
    if loads is None and misses is not None:
        loads = misses + stats.get("cache_prefetches", 0)
    out = {"loads": loads, "evictions": first("adapter_evictions", "pool_evictions",
                                              "cache_evictions"),
           "hits": hits, "misses": misses,
           "hit_rate": first("adapter_hit_rate", "hit_rate", "cache_hit_rate")}
    if out["hit_rate"] is None and hits is not None and misses is not None and hits + misses:
        out["hit_rate"] = hits / (hits + misses)
    if stats.get("adapter_load_seconds_count"):
        out["load_latency_mean_s"] = (stats["adapter_load_seconds_sum"]
                                      / stats["adapter_load_seconds_count"])
    if stats.get("queue_wait_seconds_count"):
        out["queue_wait_mean_s"] = (stats["queue_wait_seconds_sum"]
                                    / stats["queue_wait_seconds_count"])
    for key in ("adapter_load_failures", "host_cache_hits", "host_cache_misses",
                "host_cache_bytes", "cache_prefetches", "preemptions"):
        if key in stats:
            out[key] = stats[key]
    return out
