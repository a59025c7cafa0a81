"""Prometheus metrics with vLLM's names under the `flowserve:` prefix, in a per-app registry."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "flowserve:"
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._model_name = model_name
        labels = ["model_name"]
        self._running = Gauge(
            PREFIX + "num_requests_running",
            "Sequences running in the engine.",
            labels,
            registry=self.registry,
        )
        self._waiting = Gauge(
            PREFIX + "num_requests_waiting",
            "Sequences waiting for a slot in the engine.",
            labels,
            registry=self.registry,
        )
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

    def watch(self, num_running: Callable[[], float], num_waiting: Callable[[], float]) -> None:
        """Read the gauges from the engine's side at scrape time."""
        self._running.labels(self._model_name).set_function(num_running)
        self._waiting.labels(self._model_name).set_function(num_waiting)

    def record_finish(self, reason: str) -> None:
        self._success.labels(self._model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
