"""PD-aware heatmap: when does a prefill/decode pair beat a colocated instance?

Rows are prompt-length bins (tokens), columns are decode/prompt-ratio bins. A cell holds the sum
over the profiled RPS levels of ``JCT_colocated / JCT_disaggregated - 1``: positive means the
disaggregated pair finished that shape of request sooner, negative means colocated did. Summing the
per-RPS maps is DeepServe's rule; only the sign is used to route, so a cell whose sign flips with
load ends near zero and counts for little.

Bins are half-open ``[edge_i, edge_i+1)``; a value past the last edge falls in the last bin.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Mode = Literal["colocated", "disaggregated"]
MODES: tuple[Mode, ...] = ("colocated", "disaggregated")

INF = math.inf
DEFAULT_PROMPT_EDGES: tuple[float, ...] = (0, 128, 256, 512, 1024, 2048, 4096, INF)
DEFAULT_RATIO_EDGES: tuple[float, ...] = (0, 0.125, 0.25, 0.5, 1, 2, 4, INF)

JSON_FORMAT = 1

ModeReason = Literal[
    "heatmap",  # the request's own cell is measured and its sign decided
    "heatmap_nearest",  # its cell is unmeasured; the nearest measured cell of the row decided
    "heatmap_tie",  # the deciding cell is exactly zero: the default mode
    "no_heatmap",  # no heatmap for this deployment: the default mode
    "unmeasured_row",  # nothing measured for this prompt length: the default mode
    "only_colocated_ready",  # the other group has no ready instance
    "only_disaggregated_ready",  # no ready colocated instance, a ready prefill/decode pair
    "none_ready",  # neither group can take the request; the mode is the default
]


def _check_edges(name: str, edges: Sequence[float]) -> tuple[float, ...]:
    edges = tuple(float(e) for e in edges)
    if len(edges) < 2:
        raise ValueError(f"{name} needs at least two edges, got {len(edges)}")
    if edges[0] < 0 or any(math.isnan(e) for e in edges):
        raise ValueError(f"{name} must be non-negative numbers: {edges}")
    if any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(f"{name} must be strictly increasing: {edges}")
    return edges


def bin_index(edges: Sequence[float], value: float) -> int:
    """The bin of ``value``; values below the first edge go to bin 0, past the last to the last."""
    return min(max(bisect_right(edges, value) - 1, 0), len(edges) - 2)


def decode_ratio(prompt_tokens: int, decode_tokens: int) -> float:
    return decode_tokens / max(prompt_tokens, 1)


@dataclass(slots=True, frozen=True)
class PDMeasurement:
    """One profiled request: its shape, the mode that served it, its JCT, the RPS of its run."""

    prompt_tokens: int
    decode_tokens: int
    mode: Mode
    jct_s: float
    rps: float


@dataclass(slots=True, frozen=True)
class PDHeatmap:
    prompt_edges: tuple[float, ...]
    ratio_edges: tuple[float, ...]
    values: tuple[tuple[float | None, ...], ...]  # [prompt_bin][ratio_bin], None = unmeasured
    samples: tuple[tuple[int, ...], ...]  # measurements behind each value

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_edges", _check_edges("prompt_edges", self.prompt_edges))
        object.__setattr__(self, "ratio_edges", _check_edges("ratio_edges", self.ratio_edges))
        rows, cols = self.shape
        for name, grid in (("values", self.values), ("samples", self.samples)):
            if len(grid) != rows or any(len(row) != cols for row in grid):
                raise ValueError(f"{name} must be {rows} rows of {cols} cells")

    @classmethod
    def empty(
        cls,
        prompt_edges: Sequence[float] = DEFAULT_PROMPT_EDGES,
        ratio_edges: Sequence[float] = DEFAULT_RATIO_EDGES,
    ) -> PDHeatmap:
        rows, cols = len(prompt_edges) - 1, len(ratio_edges) - 1
        return cls(
            tuple(prompt_edges),
            tuple(ratio_edges),
            tuple((None,) * cols for _ in range(rows)),
            tuple((0,) * cols for _ in range(rows)),
        )

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.prompt_edges) - 1, len(self.ratio_edges) - 1

    def cell_of(self, prompt_tokens: int, decode_tokens: int) -> tuple[int, int]:
        return (
            bin_index(self.prompt_edges, prompt_tokens),
            bin_index(self.ratio_edges, decode_ratio(prompt_tokens, decode_tokens)),
        )

    def cell_value(self, prompt_tokens: int, decode_tokens: int) -> float | None:
        row, col = self.cell_of(prompt_tokens, decode_tokens)
        return self.values[row][col]

    def nearest_measured(self, row: int, col: int) -> tuple[int, int] | None:
        """The measured cell of ``row`` closest to ``col``; on a tie the shorter-decode one."""
        measured = [c for c, v in enumerate(self.values[row]) if v is not None]
        if not measured:
            return None
        return row, min(measured, key=lambda c: (abs(c - col), c))

    def to_json(self) -> dict[str, Any]:
        """A plain JSON-safe dict; the open last edge (+inf) is written as null."""
        return {
            "format": JSON_FORMAT,
            "prompt_edges": [_edge_out(e) for e in self.prompt_edges],
            "ratio_edges": [_edge_out(e) for e in self.ratio_edges],
            "values": [list(row) for row in self.values],
            "samples": [list(row) for row in self.samples],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PDHeatmap:
        if data.get("format") != JSON_FORMAT:
            raise ValueError(f"unknown PD heatmap format {data.get('format')!r}")
        try:
            return cls(
                tuple(_edge_in(e) for e in data["prompt_edges"]),
                tuple(_edge_in(e) for e in data["ratio_edges"]),
                tuple(tuple(None if v is None else float(v) for v in r) for r in data["values"]),
                tuple(tuple(int(n) for n in row) for row in data["samples"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed PD heatmap: {e}") from e


def _edge_out(edge: float) -> float | None:
    return None if math.isinf(edge) else edge


def _edge_in(edge: float | None) -> float:
    return INF if edge is None else float(edge)


def build(
    measurements: Iterable[PDMeasurement],
    *,
    prompt_edges: Sequence[float] = DEFAULT_PROMPT_EDGES,
    ratio_edges: Sequence[float] = DEFAULT_RATIO_EDGES,
) -> PDHeatmap:
    """Average the JCTs per (RPS, cell, mode), take each RPS map's ratio, add the maps.

    A cell counts at an RPS level only when both modes were measured there; RPS levels are
    grouped by exact value, as a profiler runs each at a fixed rate.
    """
    grid = PDHeatmap.empty(prompt_edges, ratio_edges)
    jcts: dict[tuple[float, int, int, Mode], list[float]] = defaultdict(list)
    for m in measurements:
        if not m.jct_s > 0:
            raise ValueError(f"jct_s must be positive, got {m.jct_s}")
        if m.mode not in MODES:
            raise ValueError(f"unknown mode {m.mode!r}")
        row, col = grid.cell_of(m.prompt_tokens, m.decode_tokens)
        jcts[(m.rps, row, col, m.mode)].append(m.jct_s)

    rows, cols = grid.shape
    values: list[list[float | None]] = [[None] * cols for _ in range(rows)]
    samples = [[0] * cols for _ in range(rows)]
    for (rps, row, col, mode), colocated in sorted(jcts.items()):
        if mode != "colocated":
            continue
        disaggregated = jcts.get((rps, row, col, "disaggregated"))
        if not disaggregated:
            continue
        ratio = _mean(colocated) / _mean(disaggregated) - 1
        values[row][col] = (values[row][col] or 0.0) + ratio
        samples[row][col] += len(colocated) + len(disaggregated)
    return PDHeatmap(
        grid.prompt_edges,
        grid.ratio_edges,
        tuple(tuple(r) for r in values),
        tuple(tuple(r) for r in samples),
    )


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


@dataclass(slots=True, frozen=True)
class ModeChoice:
    mode: Mode
    reason: ModeReason
    cell: tuple[int, int] | None  # the cell whose value decided, when one did
    value: float | None  # that cell's value


def choose_mode(
    heatmap: PDHeatmap | None,
    prompt_tokens: int,
    predicted_decode_tokens: int,
    *,
    colocated_ready: bool,
    disaggregated_ready: bool,
    default: Mode = "colocated",
) -> ModeChoice:
    """Colocated or a prefill/decode pair for this request shape.

    The heatmap's sign picks the mode; a group with no ready instance loses to the other; with
    neither ready the default is returned with reason ``none_ready``.
    """
    preferred = _from_heatmap(heatmap, prompt_tokens, predicted_decode_tokens, default)
    ready = {"colocated": colocated_ready, "disaggregated": disaggregated_ready}
    if ready[preferred.mode]:
        return preferred
    other: Mode = "disaggregated" if preferred.mode == "colocated" else "colocated"
    if ready[other]:
        reason: ModeReason = (
            "only_colocated_ready" if other == "colocated" else "only_disaggregated_ready"
        )
        return ModeChoice(other, reason, preferred.cell, preferred.value)
    return ModeChoice(default, "none_ready", preferred.cell, preferred.value)


def _from_heatmap(
    heatmap: PDHeatmap | None, prompt_tokens: int, decode_tokens: int, default: Mode
) -> ModeChoice:
    if heatmap is None:
        return ModeChoice(default, "no_heatmap", None, None)
    row, col = heatmap.cell_of(prompt_tokens, decode_tokens)
    reason: ModeReason = "heatmap"
    if heatmap.values[row][col] is None:
        nearest = heatmap.nearest_measured(row, col)
        if nearest is None:
            return ModeChoice(default, "unmeasured_row", None, None)
        row, col = nearest
        reason = "heatmap_nearest"
    value = heatmap.values[row][col]
    assert value is not None
    if value > 0:
        return ModeChoice("disaggregated", reason, (row, col), value)
    if value < 0:
        return ModeChoice("colocated", reason, (row, col), value)
    return ModeChoice(default, "heatmap_tie", (row, col), value)


@dataclass(slots=True, frozen=True)
class ProbePoint:
    cell: tuple[int, int]
    prompt_tokens: int
    decode_tokens: int


def probe_points(
    prompt_edges: Sequence[float] = DEFAULT_PROMPT_EDGES,
    ratio_edges: Sequence[float] = DEFAULT_RATIO_EDGES,
    *,
    max_total_tokens: int | None = None,
) -> list[ProbePoint]:
    """One request shape per cell for a profiler to run in both modes, row by row.

    A bin's probe is its midpoint; an open last bin ``[lo, +inf)`` is probed at ``2 * lo``.
    Cells whose probe needs more than ``max_total_tokens`` (prompt + decode, e.g. the model's
    context length) are left out and stay unmeasured.
    """
    p_edges = _check_edges("prompt_edges", prompt_edges)
    r_edges = _check_edges("ratio_edges", ratio_edges)
    points = []
    for row in range(len(p_edges) - 1):
        prompt = max(1, int(_probe(p_edges[row], p_edges[row + 1])))
        for col in range(len(r_edges) - 1):
            ratio = _probe(r_edges[col], r_edges[col + 1])
            decode = max(1, round(prompt * ratio))
            if max_total_tokens is not None and prompt + decode > max_total_tokens:
                continue
            points.append(ProbePoint((row, col), prompt, decode))
    return points


def _probe(lo: float, hi: float) -> float:
    if math.isinf(hi):
        return 2 * lo if lo > 0 else 1.0
    return (lo + hi) / 2
