"""scripts/workload.py (pure), the benchmark's bookkeeping, and a smoke run of
scripts/bench_engine.py on the tiny preset."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"


def _script(monkeypatch: pytest.MonkeyPatch, name: str) -> ModuleType:
    """scripts/ is not a package; its modules import each other by plain name, as when run."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    return importlib.import_module(name)


@pytest.fixture()
def workload(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return _script(monkeypatch, "workload")


def test_make_workload_is_deterministic(workload: ModuleType) -> None:
    a = workload.make_workload(50, 7, 1000, avoid_token_ids=[0, 1, 2])
    assert a == workload.make_workload(50, 7, 1000, avoid_token_ids=[0, 1, 2])
    assert a != workload.make_workload(50, 8, 1000, avoid_token_ids=[0, 1, 2])


def test_make_workload_respects_ranges_and_shares_prefixes(workload: ModuleType) -> None:
    avoid = {0, 1, 2, 999}
    items = workload.make_workload(400, 3, 1000, avoid_token_ids=avoid)
    assert len(items) == 400
    for item in items:
        assert 16 <= len(item.prompt_token_ids) <= 1024
        assert 16 <= item.max_tokens <= 256
        assert all(0 <= t < 1000 and t not in avoid for t in item.prompt_token_ids)
    summary = workload.summarize(items)
    assert 150 < summary.mean_prompt_len < 350  # ShareGPT-like: mean ~250
    assert 100 < summary.mean_output_len < 220
    shared = [i for i in items if i.shared_prefix_len]
    assert 0.2 < len(shared) / len(items) < 0.4
    prefixes = {i.prompt_token_ids[: i.shared_prefix_len] for i in shared}
    assert len(prefixes) <= 4 and all(len(p) == 128 for p in prefixes)
    # Every shared prompt has tokens of its own after the system prompt.
    assert all(len(i.prompt_token_ids) > i.shared_prefix_len for i in shared)


def test_make_workload_short_ranges_and_no_sharing(workload: ModuleType) -> None:
    items = workload.make_workload(
        30, 0, 64, min_prompt=4, max_prompt=8, min_out=2, max_out=3, shared_prefix_fraction=0.0
    )
    assert all(4 <= len(i.prompt_token_ids) <= 8 and 2 <= i.max_tokens <= 3 for i in items)
    assert not any(i.shared_prefix_len for i in items)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_prompt": 10, "max_prompt": 5},
        {"min_out": 0},
        {"shared_prefix_fraction": 1.5},
        {"system_prompt_len": 1024},
        {"avoid_token_ids": range(1000)},
    ],
)
def test_make_workload_rejects_bad_arguments(
    workload: ModuleType, kwargs: dict[str, object]
) -> None:
    with pytest.raises(ValueError):
        workload.make_workload(4, 0, 1000, **kwargs)


def test_spread_subset_takes_evenly(workload: ModuleType) -> None:
    items = list(range(10))
    assert workload.spread_subset(items, 5) == [0, 2, 4, 6, 8]
    assert workload.spread_subset(items, 20) == items
    assert workload.spread_subset(items, 0) == []


def test_percentile_interpolates_like_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _script(monkeypatch, "bench_runs")
    assert runs.percentile([], 50) is None
    assert runs.percentile([3.0], 99) == 3.0
    assert runs.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert runs.percentile([float(v) for v in range(101)], 99) == pytest.approx(99.0)


def test_run_summary_measures_from_arrival(monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _script(monkeypatch, "bench_runs")
    traces = [runs.Trace(0.0, [1.0, 1.5, 2.0]), runs.Trace(1.0, [1.5, 2.5])]
    s = runs.Run("x", traces, wall_s=2.5).summary()
    assert s["output_tokens"] == 5 and s["output_tok_s"] == 2.0
    assert s["ttft_p50_s"] == pytest.approx(0.75)  # 1.0 and 0.5
    assert s["itl_p50_s"] == pytest.approx(0.5)  # gaps 0.5, 0.5, 1.0
    assert s["e2e_p50_s"] == pytest.approx(1.75)  # 2.0 and 1.5
    assert s["prefix_hit_rate"] is None
    assert runs.hit_rate((10.0, 100.0), (40.0, 200.0)) == pytest.approx(0.3)
    assert runs.hit_rate(None, (1.0, 2.0)) is None
    assert runs.hit_rate((1.0, 2.0), (1.0, 2.0)) is None  # no queries in between


def test_prefix_counters_come_from_prometheus_text(monkeypatch: pytest.MonkeyPatch) -> None:
    server = _script(monkeypatch, "bench_server")
    text = """# HELP flowserve:prefix_cache_hits_total Tokens found.
# TYPE flowserve:prefix_cache_hits_total counter
flowserve:prefix_cache_hits_total{model_name="m"} 30.0
flowserve:prefix_cache_hits_created{model_name="m"} 1.7e9
flowserve:prefix_cache_queries_total{model_name="m"} 100.0
flowserve:prefix_cache_queries_total{model_name="n"} 20.0
"""
    assert server.parse_prefix_counts(text) == (30.0, 120.0)
    assert server.parse_prefix_counts("flowserve:generation_tokens_total 5.0\n") is None


def test_ratios_mark_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _script(monkeypatch, "bench_engine")

    def system(tok_s: float, ttft_p99: float = 0.1) -> dict[str, float]:
        return {"output_tok_s": tok_s, "ttft_p99_s": ttft_p99}

    summaries = {
        "hf-seq": system(10.0),
        "hf-static-16": system(30.0),
        "hf-static-32": system(40.0),
        "flowserve-server@8": system(50.0, ttft_p99=2.5),
        "flowserve-server@32": system(55.0),
    }
    rows = {r["name"]: r for r in bench.ratios(summaries)}
    assert rows["server@32 / hf-seq tok/s"]["value"] == 5.5
    assert rows["server@32 / hf-seq tok/s"]["passed"] is True
    assert rows["server@32 / best hf-static tok/s"]["value"] == pytest.approx(1.375)
    assert rows["server@32 / best hf-static tok/s"]["passed"] is False
    assert rows["server@8 TTFT p99 (s)"]["passed"] is False
    # flowserve-offline was skipped: no value, no mark.
    assert rows["offline / hf-seq tok/s"] == {
        "name": "offline / hf-seq tok/s",
        "value": None,
        "target": "",
        "passed": None,
    }


@pytest.mark.slow
def test_quick_benchmark_measures_every_system(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_engine.py"), "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    systems = result["systems"]
    expected = ["hf-seq", "hf-static-16", "hf-static-32", "flowserve-offline"]
    expected += [f"flowserve-server@{c}" for c in (1, 8, 32, 64)]
    assert list(systems) == expected
    total = result["workload"]["total_output_tokens"]
    for name, s in systems.items():
        assert s["failures"] == 0, name
        assert s["output_tok_s"] > 0, name
        assert s["ttft_p50_s"] is not None and s["ttft_p50_s"] > 0, name
        if name in ("hf-seq", "flowserve-server@1"):  # both run the same subset
            assert s["output_tokens"] == systems["hf-seq"]["output_tokens"], name
        else:
            assert s["output_tokens"] == total, name
    assert [r["name"] for r in result["ratios"]][:3] == [
        "server@32 / hf-seq tok/s",
        "server@32 / best hf-static tok/s",
        "server@8 TTFT p99 (s)",
    ]
    assert all(r["value"] is not None for r in result["ratios"])
    assert "| system |" in proc.stdout and "| ratio |" in proc.stdout
