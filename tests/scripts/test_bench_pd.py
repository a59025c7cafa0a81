"""scripts/bench_pd.py: the workload, the per-request figures and the verdict (pure), and a smoke
run of the whole benchmark on the tiny preset."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"


@pytest.fixture()
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """scripts/ is not a package; its modules import each other by plain name, as when run."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    return importlib.import_module("bench_pd")


def _keep_all(items: list[Any]) -> list[Any]:
    return list(items)


def test_mixed_workload_is_seeded_and_half_of_each_kind(bench: ModuleType) -> None:
    a = bench.mixed_workload(10, 3, 600, [0, 1, 2], _keep_all)
    assert a == bench.mixed_workload(10, 3, 600, [0, 1, 2], _keep_all)
    assert a != bench.mixed_workload(10, 4, 600, [0, 1, 2], _keep_all)
    kinds = [k for k, _ in a]
    assert kinds.count("prefill-heavy") == kinds.count("decode-heavy") == 5
    assert kinds != sorted(kinds)  # shuffled together
    for kind, item in a:
        lengths = bench.KINDS[kind]
        assert lengths["min_prompt"] <= len(item.prompt_token_ids) <= lengths["max_prompt"]
        assert lengths["min_out"] <= item.max_tokens <= lengths["max_out"]
        assert not item.shared_prefix_len
        assert all(3 <= t < 600 for t in item.prompt_token_ids)


def test_mixed_workload_takes_only_what_the_fixer_keeps(bench: ModuleType) -> None:
    def every_other(items: list[Any]) -> list[Any]:
        return [item if i % 2 else None for i, item in enumerate(items)]

    kept = bench.mixed_workload(8, 0, 600, [], every_other)
    assert len(kept) == 8
    with pytest.raises(RuntimeError, match="stream at once"):
        bench.mixed_workload(8, 0, 600, [], lambda items: [None] * len(items))


def test_poisson_offsets_are_seeded_and_average_one_over_the_rate(bench: ModuleType) -> None:
    offsets = bench.poisson_offsets(2000, 4.0, 0)
    assert offsets == bench.poisson_offsets(2000, 4.0, 0)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    assert offsets[-1] / 1999 == pytest.approx(0.25, rel=0.1)
    assert bench.poisson_offsets(5, 2.0, 0) != bench.poisson_offsets(5, 4.0, 0)[:5]


@pytest.mark.parametrize("mode", ["colocated", "disaggregated", "auto"])
def test_every_mode_gets_the_same_instances(bench: ModuleType, mode: str) -> None:
    for n in (4, 5, 8):
        groups = bench.groups_for(mode, n)
        assert sum(groups.values()) == n
        assert all(v >= 1 for v in groups.values())


def test_trace_figures(bench: ModuleType) -> None:
    t = bench.Trace("decode-heavy", sent=1.0, first=1.5, last=3.5, output_tokens=5)
    assert (t.ttft, t.jct, t.tpot) == (0.5, 2.5, 0.5)
    failed = bench.Trace("decode-heavy", sent=1.0, first=1.5, last=2.0, error="boom")
    assert (failed.ttft, failed.jct, failed.tpot) == (None, None, None)
    one = bench.Trace("prefill-heavy", sent=0.0, first=1.0, last=1.0, output_tokens=1)
    assert one.tpot is None and one.jct == 1.0


def test_summary_counts_tokens_over_the_run(bench: ModuleType) -> None:
    traces = [
        bench.Trace("a", sent=0.0, first=1.0, last=2.0, output_tokens=11, first_chunk_tokens=1),
        bench.Trace("b", sent=1.0, first=1.5, last=4.0, output_tokens=6, first_chunk_tokens=3),
        bench.Trace("b", sent=2.0, error="503"),
    ]
    s = bench.summarize(traces, ["disaggregated", "colocated", None])
    assert s["requests"] == 3 and s["failures"] == 1 and s["late_first_chunks"] == 1
    assert s["output_tokens"] == 17 and s["wall_s"] == 4.0
    assert s["output_tok_s"] == pytest.approx(17 / 4)
    assert s["disaggregated_share"] == 0.5
    assert s["jct_p50_s"] == pytest.approx(2.5)  # 2.0 and 3.0; the failed one left out
    assert s["by_kind"]["a"]["requests"] == 1 and s["by_kind"]["b"]["failures"] == 1
    assert bench.summarize(traces[:1], [None, None])["disaggregated_share"] is None


def _row(mode: str, tok_s: float, jct: float, failures: int = 0) -> dict[str, Any]:
    return {
        "mode": mode,
        "groups": "",
        "rate": 2.0,
        "requests": 4,
        "failures": failures,
        "late_first_chunks": 0,
        "output_tok_s": tok_s,
        "disaggregated_share": None,
        "by_kind": {},
        **{f"{n}_{q}_s": jct for n in ("ttft", "tpot", "jct") for q in ("p50", "p99")},
    }


def test_verdict_compares_auto_with_the_better_fixed_mode_per_figure(bench: ModuleType) -> None:
    fixed = [_row("colocated", 100.0, 1.0), _row("disaggregated", 110.0, 1.2)]
    v = bench.verdict([*fixed, _row("auto", 100.0, 1.05)], 2.0, 0.10)
    assert v["best_throughput_mode"] == "disaggregated" and v["best_jct_p50_mode"] == "colocated"
    assert v["throughput_ratio"] == pytest.approx(100 / 110)
    assert v["jct_p50_ratio"] == pytest.approx(1.05)
    assert v["passed"] is True
    assert bench.verdict([*fixed, _row("auto", 100.0, 1.2)], 2.0, 0.10)["passed"] is False
    assert bench.verdict([*fixed, _row("auto", 90.0, 1.0)], 2.0, 0.10)["passed"] is False
    assert bench.verdict([*fixed, _row("auto", 120.0, 0.9, 1)], 2.0, 0.10)["passed"] is False


def test_render_prints_the_table_and_the_verdict(bench: ModuleType) -> None:
    runs = [_row("colocated", 100.0, 1.0), _row("disaggregated", 110.0, 1.2)]
    runs.append(_row("auto", 105.0, 1.0) | {"disaggregated_share": 0.25})
    result = {"runs": runs, "verdicts": [bench.verdict(runs, 2.0, 0.1)], "profile": None}
    text = bench.render(result)
    assert "| auto |  | 2 | 4 | 105.0 | 1.00 / 1.00 | 1000 / 1000 | 1.00 / 1.00 | 25% |" in text
    assert "rate 2: " in text and text.endswith("PASS")


@pytest.mark.slow
@pytest.mark.e2e
def test_quick_benchmark_runs_every_mode(tmp_path: Path) -> None:
    out = tmp_path / "pd.json"
    cmd = [sys.executable, str(SCRIPTS / "bench_pd.py"), "--preset", "tiny"]
    cmd += ["--num-requests", "4", "--rate", "8", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["mode"] for r in result["runs"]] == ["colocated", "disaggregated", "auto"]
    for run in result["runs"]:
        assert run["failures"] == 0 and run["output_tok_s"] > 0, run
        assert run["ttft_p50_s"] > 0 and run["jct_p50_s"] >= run["ttft_p50_s"], run
    assert result["runs"][0]["disaggregated_share"] is None
    assert result["runs"][1]["disaggregated_share"] == 1.0
    assert result["profile"]["heatmap"] is not None
    assert len(result["verdicts"]) == 1
    assert "| mode | groups |" in proc.stdout and "auto no worse" in proc.stdout
