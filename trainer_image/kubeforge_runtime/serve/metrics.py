"""Prometheus metrics under vLLM's names, so existing dashboards and autoscalers work unchanged.

Names and label ``model_name`` follow vLLM's ``/metrics`` (v1 engine): the HPA adapter the
operator configures for ``autoscaling.metric: concurrency | queueDepth | kvCacheUsage`` reads
``vllm:num_requests_running``, ``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc``.
Each server gets its own ``CollectorRegistry`` (tests start several in one process).

The prefix-cache counters ``vllm:prefix_cache_queries_total`` and ``vllm:prefix_cache_hits_total``
(prompt tokens looked up in the prefix cache, and of those the tokens found cached, per served
model; hit rate = hits / queries) are read from the engines when scraped, not incremented
here: the engine's scheduler thread is what knows them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

# vLLM's own bucket boundaries, so histogram_quantile() queries give comparable answers.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

FINISH_REASONS = ("stop", "length", "abort", "timeout", "error")


PrefixStats = Callable[[], dict[str, tuple[int, int]]]
"""Per served model name: (prompt tokens looked up, tokens found) in its prefix cache."""


class PrefixCacheCollector(Collector):
    """vLLM's prefix-cache counters, read from the engines at scrape time."""

    def __init__(self, stats: PrefixStats) -> None:
        self._stats = stats

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, CounterMetricFamily]:
        return (
            CounterMetricFamily("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                labels=["model_name"]),
            CounterMetricFamily("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                labels=["model_name"]),
        )

    def collect(self) -> Iterable[Metric]:
        queries, hits = self._families()
        for name, (looked_up, found) in sorted(self._stats().items()):
            queries.add_metric([name], looked_up)
            hits.add_metric([name], found)
        return [queries, hits]

    def describe(self) -> Iterable[Metric]:
        return list(self._families())  # names only: registering must not call the engines


class ServeMetrics:
    """All serving metrics of one server process."""

    def __init__(self, kv_usage: Callable[[], float], prefix_stats: PrefixStats | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, label = self.registry, ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests generating now.", label, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests admitted and waiting for a slot.", label, registry=r)
        self.kv_cache_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 1 = full.", registry=r)
        self.kv_cache_usage.set_function(kv_usage)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", label, buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between tokens.", label, buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency end to end.", label, buckets=_E2E_BUCKETS, registry=r)
        self.queue_time = Histogram("vllm:request_queue_time_seconds", "Time spent waiting for a slot.", label, buckets=_E2E_BUCKETS, registry=r)
        # prometheus_client appends "_total" to counters: these export vllm:prompt_tokens_total etc.
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", label, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", label, registry=r)
        self.success = Counter("vllm:request_success", "Requests finished, by finish reason.", label + ["finished_reason"], registry=r)
        self.rejected = Counter("kubeforge:requests_rejected", "Requests refused by admission (HTTP 429).", label, registry=r)
        r.register(PrefixCacheCollector(prefix_stats or dict))

    def render(self) -> bytes:
        return generate_latest(self.registry)
