"""The server's Prometheus metrics, in a registry of its own (several servers may share a
process: tests, one per replica).

Per request (counted as requests end): requests by endpoint and status, request
latency and time-to-first-token histograms, prompt, generated and cached prompt
tokens, cache hits by kind. Read from the runtime at each scrape (a collector,
so nothing drifts): queue depth and running sequences per model, loaded
models, worker restarts, and the cache's per-tier bytes and rows, saves by
reason and evictions.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from erllama_py.results import Completion
from erllama_py.runtime import Runtime

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SAVE_REASONS = ("cold", "continued", "finish", "evict", "shutdown")


class Metrics:
    """The counters and histograms the routes feed, and the collector that reads the runtime."""

    def __init__(self, runtime: Runtime | None = None) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "erllama_http_requests", "HTTP requests by endpoint and status.",
            ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "erllama_http_request_duration_seconds", "HTTP request latency.",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "erllama_time_to_first_token_seconds", "Submission to first token, per request.",
            ["model"], buckets=_TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "erllama_prompt_tokens", "Prompt tokens of completed requests.", ["model"], registry=r
        )
        self.generated_tokens = Counter(
            "erllama_generated_tokens", "Generated tokens.", ["model"], registry=r
        )
        self.cached_tokens = Counter(
            "erllama_cached_prompt_tokens", "Prompt tokens restored from the cache.",
            ["model"], registry=r,
        )  # fmt: skip
        self.cache_hits = Counter(
            "erllama_cache_hits", "Requests by how the cache served their prompt.",
            ["model", "kind"], registry=r,
        )  # fmt: skip
        if runtime is not None:
            r.register(_RuntimeCollector(runtime))

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_completion(self, model: str, result: Completion) -> None:
        usage = result.usage
        self.prompt_tokens.labels(model).inc(usage.prompt_tokens)
        self.generated_tokens.labels(model).inc(usage.completion_tokens)
        self.cached_tokens.labels(model).inc(usage.cached_tokens)
        self.cache_hits.labels(model, str(result.cache.kind)).inc()
        if result.timings.ttft_ms is not None:
            self.ttft.labels(model).observe(result.timings.ttft_ms / 1000.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RuntimeCollector(Collector):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        rt = self.runtime
        if rt.stopped:
            return
        queue = GaugeMetricFamily("erllama_queue_depth", "Requests waiting for a sequence.",
                                  labels=["model"])  # fmt: skip
        running = GaugeMetricFamily("erllama_running_sequences", "Requests being served.",
                                    labels=["model"])  # fmt: skip
        loaded = GaugeMetricFamily("erllama_model_loaded", "1 while the model serves.",
                                   labels=["model"])  # fmt: skip
        restarts = CounterMetricFamily("erllama_worker_restarts",
                                       "Restarts of the model's context worker.",
                                       labels=["model"])  # fmt: skip
        for info in rt.models():
            queue.add_metric([info.name], info.pending_len)
            running.add_metric([info.name], info.active)
            loaded.add_metric([info.name], 1.0 if info.status == "loaded" else 0.0)
            restarts.add_metric([info.name], info.worker.restarts)
        yield from (queue, running, loaded, restarts)
        counters = rt.counters()
        tier_bytes = GaugeMetricFamily("erllama_cache_bytes", "Bytes held by a cache tier.",
                                       labels=["tier", "kind"])  # fmt: skip
        tier_rows = GaugeMetricFamily("erllama_cache_rows", "Rows held by a cache tier.",
                                      labels=["tier", "kind"])  # fmt: skip
        for tier in counters.tiers:
            tier_bytes.add_metric([tier.name, str(tier.kind)], tier.bytes)
            tier_rows.add_metric([tier.name, str(tier.kind)], tier.rows)
        yield from (tier_bytes, tier_rows)
        saves = CounterMetricFamily("erllama_cache_saves", "Rows saved, by reason.",
                                    labels=["reason"])  # fmt: skip
        for reason in _SAVE_REASONS:
            saves.add_metric([reason], getattr(counters, f"saves_{reason}"))
        yield saves
        yield CounterMetricFamily(
            "erllama_cache_evictions", "Rows evicted from a tier.", value=counters.evictions
        )
