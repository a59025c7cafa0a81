"""scripts/bench_semipd.py: arrivals, per-request figures, attainment and the sustained rate
(pure), the disaggregated system's hand-off, and a smoke run of the whole benchmark on the tiny
preset on the CPU."""

from __future__ import annotations

import importlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dataplane.modelstore import create_random

    return create_random(tmp_path_factory.mktemp("semipd") / "tiny", "tiny", seed=1)


@pytest.fixture()
def metrics(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(SCRIPTS))
    return importlib.import_module("semipd_metrics")


@pytest.fixture()
def systems(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(SCRIPTS))
    return importlib.import_module("semipd_systems")


def test_poisson_arrivals_are_seeded_with_the_asked_rate(metrics: ModuleType) -> None:
    a = metrics.poisson_arrivals(50.0, 4000, 1)
    assert a == metrics.poisson_arrivals(50.0, 4000, 1)
    assert a != metrics.poisson_arrivals(50.0, 4000, 2)
    assert a[0] == 0.0 and a == sorted(a)
    gaps = [y - x for x, y in zip(a, a[1:], strict=False)]
    assert statistics.mean(gaps) == pytest.approx(1 / 50.0, rel=0.05)
    with pytest.raises(ValueError):
        metrics.poisson_arrivals(0.0, 3, 0)


def test_ttft_tpot_and_attainment(metrics: ModuleType, systems: ModuleType) -> None:
    trace = systems.Trace(10.0, 3, [10.25, 10.5, 11.0])
    assert metrics.ttft(trace) == 0.25
    assert metrics.tpot(trace) == 0.375
    assert metrics.attains(trace, 0.25, 0.375)
    assert not metrics.attains(trace, 0.24, 0.375)
    assert not metrics.attains(trace, 0.25, 0.37)
    unfinished = systems.Trace(10.0, 4, [10.1, 10.2])
    assert not metrics.attains(unfinished, 1.0, 1.0)
    one = systems.Trace(0.0, 1, [0.1])
    assert metrics.tpot(one) is None and metrics.attains(one, 0.1, 0.0)


def test_rate_point(metrics: ModuleType, systems: ModuleType) -> None:
    traces = [
        systems.Trace(0.0, 2, [0.1, 0.2]),  # attains
        systems.Trace(0.0, 2, [0.5, 0.6]),  # TTFT misses
        systems.Trace(0.0, 2, [0.1]),  # unfinished
        systems.Trace(0.0, 2, [0.1, 0.9]),  # TPOT misses
    ]
    point = metrics.rate_point(5.0, traces, 0.2, 0.2, 2.0)
    assert point.attainment == 0.25
    assert point.num_requests == 4 and point.num_finished == 3
    assert point.output_tok_s == 7 / 2.0
    assert point.e2e_mean_s == pytest.approx((0.2 + 0.6 + 0.9) / 3)
    assert point.ttft_p90_s == pytest.approx(metrics.percentile([0.1, 0.5, 0.1, 0.1], 90))


def test_sustained_rate_interpolates_where_attainment_crosses(metrics: ModuleType) -> None:
    curve = [(10.0, 1.0), (20.0, 0.95), (30.0, 0.85), (40.0, 0.2)]
    assert metrics.sustained_rate(curve, 0.9) == pytest.approx(25.0)
    assert metrics.sustained_rate(list(reversed(curve)), 0.9) == pytest.approx(25.0)
    assert metrics.sustained_rate([(10.0, 0.95), (20.0, 0.91)], 0.9) == 20.0
    assert metrics.sustained_rate([(10.0, 0.5), (20.0, 0.95)], 0.9) is None
    assert metrics.sustained_rate([], 0.9) is None


def test_disaggregated_hand_off_equals_colocated(systems: ModuleType, tiny_model_dir: Path) -> None:
    """Greedy tokens through the prefill engine, the K/V hand-off and the decode engine, each
    on its own partition, are a colocated engine's."""
    from dataplane.flowserve.config import EngineConfig
    from dataplane.flowserve.engine import Engine

    def config() -> EngineConfig:
        return EngineConfig(str(tiny_model_dir), device="cpu", kv_cache_bytes=8 << 20)

    prompts = [[5 + i, 9, 17, 33 + i, 40] * (2 + i) for i in range(4)]
    colocated = systems.SingleEngine("colocated", Engine(config()))
    disaggregated = systems.Disaggregated(Engine(config()), Engine(config()))
    answers: dict[str, list[list[int]]] = {}
    for system in (colocated, disaggregated):
        for i, prompt in enumerate(prompts):
            system.submit(f"r{i}", prompt, 12)
        deadline = time.monotonic() + 60
        while not all(t.done for t in system.traces.values()):
            assert time.monotonic() < deadline and not system.errors()
            time.sleep(0.01)
        traces = [system.traces[f"r{i}"] for i in range(len(prompts))]
        assert all(len(t.token_times) == len(t.token_ids) == 12 for t in traces)
        answers[system.name] = [t.token_ids for t in traces]
        system.close()
    assert answers["disaggregated"] == answers["colocated"]
    for engine in (disaggregated.prefill.engine, disaggregated.decode.engine):
        assert engine.block_manager.num_free_blocks == engine.num_kv_blocks


@pytest.mark.slow
def test_quick_run_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "semipd.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_semipd.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "req/s at 90% attainment" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["systems"]) == {
        "colocated",
        "disaggregated",
        "semi-pd-static",
        "semi-pd-dynamic",
    }
    for entry in result["systems"].values():
        assert "error" not in entry
        for point in entry["points"]:
            assert point["num_finished"] == point["num_requests"]
    assert result["slo"]["ttft_s"] > 0 and set(result["ratios"]) == {"colocated", "disaggregated"}


def _result(slo_ttft: float, systems: dict[str, list[tuple[float, float]]]) -> dict[str, object]:
    return {
        "slo": {"ttft_s": slo_ttft, "tpot_s": 0.01, "scale": 7.5},
        "systems": {
            name: {"points": [{"rate": r, "attainment": a} for r, a in points]}
            for name, points in systems.items()
        },
    }


def test_split_runs_merge_by_rate_and_refuse_other_slos(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(SCRIPTS))
    bench = importlib.import_module("bench_semipd")
    first = _result(0.1, {"colocated": [(40, 0.95), (80, 0.5)], "semi-pd-dynamic": [(40, 1.0)]})
    later = _result(0.1001, {"semi-pd-dynamic": [(40, 0.99), (120, 0.99), (160, 0.5)]})
    merged = bench.merge([first, later])
    dynamic = merged["systems"]["semi-pd-dynamic"]
    assert [(p["rate"], p["attainment"]) for p in dynamic["points"]] == [
        (40, 0.99),  # the later run's point at the same rate
        (120, 0.99),
        (160, 0.5),
    ]
    colocated = merged["systems"]["colocated"]["sustained_rate"]
    assert colocated == pytest.approx(40 + 40 * 0.05 / 0.45)
    assert dynamic["sustained_rate"] == pytest.approx(120 + 40 * 0.09 / 0.49)
    ratio = merged["ratios"]["colocated"]
    assert ratio["value"] == pytest.approx(dynamic["sustained_rate"] / colocated)
    assert ratio["pass"] is True
    with pytest.raises(SystemExit, match="SLOs differ"):
        bench.merge([first, _result(0.2, {})])
