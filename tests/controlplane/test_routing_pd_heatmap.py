from __future__ import annotations

import json
import math

import pytest

from controlplane.routing.pd_heatmap import (
    DEFAULT_PROMPT_EDGES,
    DEFAULT_RATIO_EDGES,
    PDHeatmap,
    PDMeasurement,
    bin_index,
    build,
    choose_mode,
    probe_points,
)

EDGES_P = (0, 100, 1000, math.inf)
EDGES_R = (0, 1, 4, math.inf)


def grid(values: list[list[float | None]]) -> PDHeatmap:
    samples = tuple(tuple(0 if v is None else 4 for v in row) for row in values)
    return PDHeatmap(EDGES_P, EDGES_R, tuple(tuple(r) for r in values), samples)


def pair(
    prompt: int, decode: int, colocated: float, disaggregated: float, rps: float = 1.0
) -> list[PDMeasurement]:
    return [
        PDMeasurement(prompt, decode, "colocated", colocated, rps),
        PDMeasurement(prompt, decode, "disaggregated", disaggregated, rps),
    ]


# bins


def test_bin_index_half_open_and_clamped() -> None:
    assert bin_index(EDGES_P, 0) == 0
    assert bin_index(EDGES_P, 99) == 0
    assert bin_index(EDGES_P, 100) == 1
    assert bin_index(EDGES_P, 10**9) == 2
    assert bin_index((10, 20, 30), 5) == 0  # below the first edge
    assert bin_index((10, 20, 30), 99) == 1  # past a finite last edge


def test_cell_of_uses_decode_over_prompt_ratio() -> None:
    h = PDHeatmap.empty(EDGES_P, EDGES_R)
    assert h.cell_of(50, 10) == (0, 0)
    assert h.cell_of(500, 500) == (1, 1)  # ratio exactly 1 is in [1, 4)
    assert h.cell_of(5000, 50000) == (2, 2)
    assert h.cell_of(0, 10) == (0, 2)  # a zero-token prompt counts as one token


def test_default_layout() -> None:
    h = PDHeatmap.empty()
    assert h.shape == (7, 7)
    assert h.prompt_edges == tuple(float(e) for e in DEFAULT_PROMPT_EDGES)
    assert h.ratio_edges[-1] == math.inf
    assert h.cell_value(300, 30) is None


@pytest.mark.parametrize("edges", [(0,), (0, 0), (10, 5), (-1, 3)])
def test_bad_edges_rejected(edges: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        PDHeatmap.empty(edges, EDGES_R)


def test_grid_shape_checked() -> None:
    with pytest.raises(ValueError, match="values"):
        PDHeatmap(EDGES_P, EDGES_R, ((None,),), ((0,),))


# build


def test_build_single_rps_cell_value() -> None:
    ms = pair(500, 100, colocated=3.0, disaggregated=2.0)
    h = build(ms, prompt_edges=EDGES_P, ratio_edges=EDGES_R)
    assert h.cell_value(500, 100) == pytest.approx(0.5)
    assert h.samples[1][0] == 2
    assert h.cell_value(50, 10) is None
    assert h.samples[0][0] == 0


def test_build_averages_within_cell_and_sums_over_rps() -> None:
    ms = [
        *pair(500, 100, 2.0, 2.0, rps=5),
        *pair(600, 120, 4.0, 2.0, rps=5),  # same cell: colocated mean 3, disagg mean 2 -> +0.5
        *pair(500, 100, 1.0, 2.0, rps=10),  # -0.5 at rps 10
        *pair(500, 100, 3.0, 1.0, rps=20),  # +2.0 at rps 20
    ]
    h = build(ms, prompt_edges=EDGES_P, ratio_edges=EDGES_R)
    assert h.values[1][0] == pytest.approx(0.5 - 0.5 + 2.0)
    assert h.samples[1][0] == len(ms)


def test_build_needs_both_modes_at_the_same_rps() -> None:
    ms = [
        PDMeasurement(500, 100, "colocated", 1.0, 5),
        PDMeasurement(500, 100, "disaggregated", 1.0, 10),
        *pair(50, 5, 2.0, 1.0, rps=5),
    ]
    h = build(ms, prompt_edges=EDGES_P, ratio_edges=EDGES_R)
    assert h.values[1][0] is None
    assert h.samples[1][0] == 0
    assert h.values[0][0] == pytest.approx(1.0)


def test_build_empty_is_all_unmeasured() -> None:
    h = build([])
    assert all(v is None for row in h.values for v in row)
    assert all(n == 0 for row in h.samples for n in row)


def test_build_rejects_bad_measurements() -> None:
    with pytest.raises(ValueError, match="jct_s"):
        build([PDMeasurement(10, 10, "colocated", 0.0, 1)])
    with pytest.raises(ValueError, match="mode"):
        build([PDMeasurement(10, 10, "prefill", 1.0, 1)])  # type: ignore[arg-type]


# JSON


def test_json_round_trip_through_text() -> None:
    h = build(
        [*pair(500, 100, 3.0, 2.0), *pair(5000, 50000, 1.0, 4.0)],
        prompt_edges=EDGES_P,
        ratio_edges=EDGES_R,
    )
    data = json.loads(json.dumps(h.to_json(), allow_nan=False))  # strict JSON: no Infinity
    assert data["prompt_edges"][-1] is None
    assert PDHeatmap.from_json(data) == h


def test_json_round_trip_default_empty() -> None:
    h = PDHeatmap.empty()
    assert PDHeatmap.from_json(json.loads(json.dumps(h.to_json()))) == h


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"format": 99},
        {"format": 1, "prompt_edges": [0, None]},
        {"format": 1, "prompt_edges": [0, None], "ratio_edges": [0, None], "values": [[1.0]],
         "samples": [[1], [2]]},
    ],
)  # fmt: skip
def test_from_json_rejects_malformed(data: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PDHeatmap.from_json(data)


# choose_mode


H = grid(
    [
        [-0.2, None, None],  # short prompts: colocated measured only for short decodes
        [0.4, None, -0.1],  # middle row: nearest measured decides
        [None, None, None],  # long prompts: nothing measured
    ]
)


def test_positive_cell_goes_disaggregated() -> None:
    c = choose_mode(H, 500, 100, colocated_ready=True, disaggregated_ready=True)
    assert (c.mode, c.reason, c.cell, c.value) == ("disaggregated", "heatmap", (1, 0), 0.4)


def test_negative_cell_goes_colocated() -> None:
    c = choose_mode(H, 50, 10, colocated_ready=True, disaggregated_ready=True)
    assert (c.mode, c.reason, c.cell) == ("colocated", "heatmap", (0, 0))


def test_unmeasured_cell_uses_nearest_in_row() -> None:
    c = choose_mode(H, 50, 300, colocated_ready=True, disaggregated_ready=True)
    assert (c.mode, c.reason, c.cell) == ("colocated", "heatmap_nearest", (0, 0))
    c = choose_mode(H, 500, 5000, colocated_ready=True, disaggregated_ready=True)
    assert (c.mode, c.reason, c.cell) == ("colocated", "heatmap", (1, 2))


def test_nearest_tie_goes_to_shorter_decode() -> None:
    # (1, 1) is equidistant from (1, 0) = +0.4 and (1, 2) = -0.1
    c = choose_mode(H, 500, 1000, colocated_ready=True, disaggregated_ready=True)
    assert (c.mode, c.reason, c.cell) == ("disaggregated", "heatmap_nearest", (1, 0))


def test_unmeasured_row_and_no_heatmap_use_default() -> None:
    c = choose_mode(H, 5000, 10, colocated_ready=True, disaggregated_ready=True)
    assert (c.mode, c.reason, c.cell) == ("colocated", "unmeasured_row", None)
    c = choose_mode(
        H, 5000, 10, colocated_ready=True, disaggregated_ready=True, default="disaggregated"
    )
    assert c.mode == "disaggregated"
    c = choose_mode(None, 500, 100, colocated_ready=True, disaggregated_ready=True)
    assert (c.mode, c.reason) == ("colocated", "no_heatmap")


def test_zero_cell_is_a_tie() -> None:
    h = grid([[0.0, None, None], [None] * 3, [None] * 3])
    c = choose_mode(h, 50, 10, colocated_ready=True, disaggregated_ready=True)
    assert (c.mode, c.reason, c.cell) == ("colocated", "heatmap_tie", (0, 0))


def test_unready_group_loses() -> None:
    c = choose_mode(H, 500, 100, colocated_ready=True, disaggregated_ready=False)
    assert (c.mode, c.reason, c.cell) == ("colocated", "only_colocated_ready", (1, 0))
    c = choose_mode(H, 50, 10, colocated_ready=False, disaggregated_ready=True)
    assert (c.mode, c.reason) == ("disaggregated", "only_disaggregated_ready")
    c = choose_mode(None, 50, 10, colocated_ready=False, disaggregated_ready=True)
    assert c.mode == "disaggregated"


def test_none_ready_returns_default() -> None:
    c = choose_mode(H, 500, 100, colocated_ready=False, disaggregated_ready=False)
    assert (c.mode, c.reason) == ("colocated", "none_ready")


# probes


def test_probe_points_land_in_their_cells() -> None:
    h = PDHeatmap.empty()
    points = probe_points()
    assert len(points) == 7 * 7
    assert len({p.cell for p in points}) == 49
    for p in points:
        assert h.cell_of(p.prompt_tokens, p.decode_tokens) == p.cell
        assert p.prompt_tokens >= 1 and p.decode_tokens >= 1
    assert points[0].prompt_tokens == 64
    assert max(p.prompt_tokens for p in points) == 8192  # the open bin [4096, inf) probed at 2x


def test_probe_points_respect_context_length() -> None:
    points = probe_points(max_total_tokens=4096)
    assert points
    assert all(p.prompt_tokens + p.decode_tokens <= 4096 for p in points)
    assert (0, 0) in {p.cell for p in points}
    assert all(p.cell[0] < 6 for p in points)


def test_probe_then_build_fills_every_probed_cell() -> None:
    points = probe_points(EDGES_P, EDGES_R)
    ms = [m for p in points for m in pair(p.prompt_tokens, p.decode_tokens, 2.0, 1.0)]
    h = build(ms, prompt_edges=EDGES_P, ratio_edges=EDGES_R)
    assert all(v == pytest.approx(1.0) for row in h.values for v in row)


def test_default_ratio_edges_cover_paper_range() -> None:
    assert 4 in DEFAULT_RATIO_EDGES  # the paper's x axis runs to about 2-4
