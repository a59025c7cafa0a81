"""Prometheus metrics with vLLM's names under the `flowserve:` prefix, in a per-app registry.

Engine-side figures (queues, KV usage, prefix cache, preemptions) are read from a snapshot the
engine thread publishes, at scrape time; latencies are observed by the engine thread as tokens
come out. Counters get Prometheus's `_total` suffix, as vLLM's do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from dataplane.flowserve.engine import EngineStats

PREFIX = "flowserve:"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# vLLM's buckets, in seconds.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class _EngineCollector(Collector):
    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None]) -> None:
        self._model_name = model_name
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:
            return
        labels = ["model_name"]
        name = [self._model_name]
        gauges = (
            (
                "num_requests_running",
                "Sequences running in the engine.",
                stats.num_requests_running,
            ),
            ("num_requests_waiting", "Sequences waiting for a slot.", stats.num_requests_waiting),
            (
                "kv_cache_usage_perc",
                "Fraction of KV cache blocks in use (1 = all).",
                stats.kv_cache_usage_perc,
            ),
        )
        for metric, doc, value in gauges:
            family = GaugeMetricFamily(PREFIX + metric, doc, labels=labels)
            family.add_metric(name, value)
            yield family
        counters = (
            (
                "prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                stats.prefix_cache_queries,
            ),
            (
                "prefix_cache_hits",
                "Prompt tokens found in the prefix cache.",
                stats.prefix_cache_hits,
            ),
            ("num_preemptions", "Sequences preempted (recomputed later).", stats.num_preemptions),
        )
        for metric, doc, value in counters:
            counter = CounterMetricFamily(PREFIX + metric, doc, labels=labels)
            counter.add_metric(name, value)
            yield counter


KVDirection = Literal["export", "import"]
# export: ok (stored for the decode instance), failed (over the byte cap, unwritable), expired
# (not fetched within the TTL); import: ok, failed (missing, expired, unreadable), mismatch.
KVOutcome = Literal["ok", "failed", "expired", "mismatch"]


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._model_name = model_name
        labels = ["model_name"]
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens taken.", labels, registry=self.registry
        ).labels(model_name)
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Tokens generated.", labels, registry=self.registry
        ).labels(model_name)
        self._success = Counter(
            PREFIX + "request_success",
            "Sequences that finished (not aborted), by finish reason.",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self.time_to_first_token = self._histogram(
            "time_to_first_token_seconds",
            "From a request's arrival to its first token.",
            TTFT_BUCKETS,
        )
        self.inter_token_latency = self._histogram(
            "inter_token_latency_seconds", "Between two tokens of one sequence.", ITL_BUCKETS
        )
        self.e2e_request_latency = self._histogram(
            "e2e_request_latency_seconds",
            "From a request's arrival to its last token.",
            E2E_BUCKETS,
        )
        # PD disaggregation: bytes are those of the serialized transfers.
        self.kv_exported_bytes = Counter(
            PREFIX + "kv_exported_bytes",
            "Bytes of prompt K/V exported for decode instances.",
            labels,
            registry=self.registry,
        ).labels(model_name)
        self.kv_imported_bytes = Counter(
            PREFIX + "kv_imported_bytes",
            "Bytes of prompt K/V imported from prefill instances.",
            labels,
            registry=self.registry,
        ).labels(model_name)
        self._kv_transfers = Counter(
            PREFIX + "kv_transfers",
            "K/V transfers by direction and outcome.",
            [*labels, "direction", "outcome"],
            registry=self.registry,
        )

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        family = Histogram(
            PREFIX + name, doc, ["model_name"], buckets=buckets, registry=self.registry
        )
        return family.labels(self._model_name)

    def watch(self, stats: Callable[[], EngineStats | None]) -> None:
        """Read the engine's gauges and counters from `stats()` at scrape time."""
        self.registry.register(_EngineCollector(self._model_name, stats))

    def record_finish(self, reason: str) -> None:
        self._success.labels(self._model_name, reason).inc()

    def record_kv_transfer(
        self, direction: KVDirection, outcome: KVOutcome, num_bytes: int = 0
    ) -> None:
        self._kv_transfers.labels(self._model_name, direction, outcome).inc()
        if outcome == "ok":
            counter = self.kv_exported_bytes if direction == "export" else self.kv_imported_bytes
            counter.inc(num_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
