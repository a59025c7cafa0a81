"""Prometheus series of a semi-PD instance, read from the engine at scrape time:

flowserve:semipd_prefill_share          gauge, percent of the device's compute
flowserve:semipd_prefill_units          gauge, threads or SMs (and _decode_units)
flowserve:semipd_switches_total         counter by reason (ttft_miss, tpot_miss,
                                        give_back; manual for set_split)
flowserve:semipd_ttft_p90_seconds       gauge, the newest window's that measured it (and
                                        _tpot_p90_seconds); absent until one has
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dataplane.flowserve.metrics import PREFIX
from dataplane.flowserve.semipd.engine import SemiPDEngine


class SemiPDCollector(Collector):
    def __init__(self, model_name: str, engine: SemiPDEngine) -> None:
        self._model_name = model_name
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        report = self._engine.report()
        labels, name = ["model_name"], [self._model_name]
        gauges: list[tuple[str, str, float]] = [
            ("semipd_prefill_share", "The prefill worker's share, percent.", report.prefill_share),
            ("semipd_prefill_units", "Threads or SMs of the prefill worker.", report.prefill_units),
            ("semipd_decode_units", "Threads or SMs of the decode worker.", report.decode_units),
        ]
        for phase, value in (("ttft", report.ttft_p90_s), ("tpot", report.tpot_p90_s)):
            if value is not None:
                doc = f"P90 {phase.upper()} of the newest controller window that measured it."
                gauges.append((f"semipd_{phase}_p90_seconds", doc, value))
        for metric, doc, value in gauges:
            family = GaugeMetricFamily(PREFIX + metric, doc, labels=labels)
            family.add_metric(name, value)
            yield family
        reasons = Counter(str(record["reason"]) for record in report.records)
        reasons["manual"] = report.num_switches - len(report.records)
        counter = CounterMetricFamily(
            PREFIX + "semipd_switches",
            "Changes of the split, by reason.",
            labels=[*labels, "reason"],
        )
        for reason, count in sorted(reasons.items()):
            counter.add_metric([*name, reason], count)
        yield counter
