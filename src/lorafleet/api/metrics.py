"""Prometheus metrics of the HTTP server: request/token counters by adapter, latencies, and the
engine's own numbers (queue, batch, pool pages, adapter cache) read from `engine.stats()` at
scrape time so they are never stale.

Each app owns its registry, so several servers in one process (tests) do not collide.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

BASE_LABEL = "__base__"  # the `adapter` label of requests to the bare base model

# Latency buckets in seconds: a tiny CPU model answers in milliseconds, a 7B on GPU in seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# engine.stats() key -> (metric name, help). Keys the engine does not report are skipped; any
# other numeric key is still exported as lorafleet_engine_stat{name=...}.
ENGINE_GAUGES = {
    "queue_depth": ("lorafleet_queue_depth", "Requests waiting for admission"),
    "waiting": ("lorafleet_queue_depth", "Requests waiting for admission"),
    "running": ("lorafleet_running_batch_size", "Requests in the running batch"),
    "running_batch": ("lorafleet_running_batch_size", "Requests in the running batch"),
    "pages_total": ("lorafleet_pool_pages_total", "Pages in the unified pool"),
    "pages_free": ("lorafleet_pool_pages_free", "Free pages in the unified pool"),
    "pages_kv": ("lorafleet_pool_pages_kv", "Pool pages holding KV cache"),
    "pages_adapter": ("lorafleet_pool_pages_adapters", "Pool pages holding adapter weights"),
    "adapters_in_use": ("lorafleet_adapters_in_use", "Adapters used by running requests"),
    "pool_pages_total": ("lorafleet_pool_pages_total", "Pages in the unified pool"),
    "pool_pages_free": ("lorafleet_pool_pages_free", "Free pages in the unified pool"),
    "pool_pages_kv": ("lorafleet_pool_pages_kv", "Pool pages holding KV cache"),
    "kv_pages": ("lorafleet_pool_pages_kv", "Pool pages holding KV cache"),
    "pool_pages_adapters": ("lorafleet_pool_pages_adapters", "Pool pages holding adapter weights"),
    "adapter_pages": ("lorafleet_pool_pages_adapters", "Pool pages holding adapter weights"),
    "adapters_resident": ("lorafleet_adapters_resident", "Adapters resident in the pool"),
    "adapters_registered": ("lorafleet_adapters_registered", "Adapters registered"),
}
ENGINE_COUNTERS = {
    "cache_hits": ("lorafleet_adapter_cache_hits", "Adapter cache hits"),
    "adapter_cache_hits": ("lorafleet_adapter_cache_hits", "Adapter cache hits"),
    "cache_misses": ("lorafleet_adapter_cache_misses", "Adapter cache misses (loads into pool)"),
    "adapter_cache_misses": ("lorafleet_adapter_cache_misses",
                             "Adapter cache misses (loads into pool)"),
    "cache_evictions": ("lorafleet_adapter_cache_evictions", "Adapters evicted from the pool"),
    "adapter_cache_evictions": ("lorafleet_adapter_cache_evictions",
                                "Adapters evicted from the pool"),
    "failed_steps": ("lorafleet_engine_failed_steps",
                     "Engine steps that raised (their running requests failed with a 500)"),
}


# vLLM's names for the same gauges (labelled model_name, as vLLM's Grafana dashboard filters).
VLLM_GAUGES = {
    "running": ("vllm:num_requests_running", "Number of requests in model execution batches."),
    "queue_depth": ("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
}


def flatten_stats(stats: Any, prefix: str = "") -> dict[str, float]:
    """Numbers of a (possibly nested) stats dict or dataclass, keys joined with '_'."""
    if hasattr(stats, "__dataclass_fields__"):
        stats = {name: getattr(stats, name) for name in stats.__dataclass_fields__}
    flat: dict[str, float] = {}
    if not isinstance(stats, dict):
        return flat
    for key, value in stats.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            flat[name] = float(value)
        elif isinstance(value, (int, float)):
            flat[name] = float(value)
        elif isinstance(value, dict) or hasattr(value, "__dataclass_fields__"):
            flat.update(flatten_stats(value, f"{name}_"))
    return flat


class EngineCollector:
    """A custom collector: reads `stats_fn()` on every scrape."""

    def __init__(self, stats_fn: Callable[[], Any], model_name: str = "base"):
        self.stats_fn = stats_fn
        self.model_name = model_name

    def collect(self):
        try:
            stats = flatten_stats(self.stats_fn())
        except Exception:  # a scrape must never take the server down; log and report nothing
            log.exception("engine.stats() failed during a metrics scrape")
            return
        emitted = set()
        for table, suffix in ((ENGINE_GAUGES, ""), (ENGINE_COUNTERS, "_total")):
            for key, (name, doc) in table.items():
                if key in stats and name not in emitted:
                    emitted.add(name)
                    # Counters the engine keeps are exported as gauges named *_total: we only
                    # mirror its value, and Prometheus' rate() works on either.
                    family = GaugeMetricFamily(name + suffix, doc)
                    family.add_metric([], stats[key])
                    yield family
        for key, (name, doc) in VLLM_GAUGES.items():
            if key in stats:
                family = GaugeMetricFamily(name, doc, labels=["model_name"])
                family.add_metric([self.model_name], stats[key])
                yield family
        total, free = stats.get("pages_total"), stats.get("pages_free")
        if total:       # the unified pool is vLLM's KV cache (adapters share it here)
            for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
                family = GaugeMetricFamily(name, "Fraction of the KV/adapter page pool in use "
                                           "(1 = full).", labels=["model_name"])
                family.add_metric([self.model_name], 1.0 - (free or 0) / total)
                yield family
        every = GaugeMetricFamily("lorafleet_engine_stat", "Every numeric engine.stats() value",
                                  labels=["name"])
        for key, value in sorted(stats.items()):
            every.add_metric([key], value)
        yield every


class ServerMetrics:
    def __init__(self, stats_fn: Callable[[], Any], model_name: str = "base"):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.requests = Counter("lorafleet_requests", "HTTP generation requests",
                                ["adapter", "endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("lorafleet_prompt_tokens", "Prompt tokens processed",
                                     ["adapter"], registry=self.registry)
        self.completion_tokens = Counter("lorafleet_completion_tokens", "Tokens generated",
                                         ["adapter"], registry=self.registry)
        self.aborted = Counter("lorafleet_aborted_requests",
                               "Requests aborted because the client went away",
                               ["adapter"], registry=self.registry)
        self.rejected = Counter("lorafleet_rejected_requests", "Requests refused (by reason)",
                                ["reason"], registry=self.registry)
        self.throttled = Counter("lorafleet_throttled_requests",
                                 "Requests refused by a per-key limit (429)", ["key"],
                                 registry=self.registry)
        self.latency = Histogram("lorafleet_request_latency_seconds",
                                 "Time from request to last token", ["adapter"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("lorafleet_time_to_first_token_seconds",
                              "Time from request to first token", ["adapter"],
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        # The same numbers under vLLM's names, so dashboards built for vLLM work unchanged.
        self.vllm_prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens "
                                          "processed.", ["model_name"], registry=self.registry)
        self.vllm_generation_tokens = Counter("vllm:generation_tokens", "Number of generation "
                                              "tokens processed.", ["model_name"],
                                              registry=self.registry)
        self.vllm_success = Counter("vllm:request_success", "Count of successfully processed "
                                    "requests.", ["model_name", "finished_reason"],
                                    registry=self.registry)
        self.vllm_ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to "
                                   "first token in seconds.", ["model_name"],
                                   buckets=LATENCY_BUCKETS, registry=self.registry)
        self.vllm_e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of end to end "
                                  "request latency in seconds.", ["model_name"],
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(EngineCollector(stats_fn, model_name))

    def observe_ttft(self, label: str, seconds: float) -> None:
        self.ttft.labels(label).observe(seconds)
        self.vllm_ttft.labels(self.model_name).observe(seconds)

    def observe_request(self, label: str, endpoint: str, status: str, prompt_tokens: int,
                        completion_tokens: int, seconds: float,
                        finish_reasons: list[str | None]) -> None:
        """One finished HTTP generation request, under both names."""
        self.requests.labels(label, endpoint, status).inc()
        self.prompt_tokens.labels(label).inc(prompt_tokens)
        self.completion_tokens.labels(label).inc(completion_tokens)
        self.latency.labels(label).observe(seconds)
        self.vllm_prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        self.vllm_generation_tokens.labels(self.model_name).inc(completion_tokens)
        self.vllm_e2e.labels(self.model_name).observe(seconds)
        for reason in finish_reasons:
            if reason is not None:
                self.vllm_success.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def adapter_label(adapter: str | None) -> str:
    return BASE_LABEL if adapter is None else adapter
