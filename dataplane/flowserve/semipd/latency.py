"""semi-PD's latency models, fitted by least squares from (share, observed latency) points.

    TTFT(x) = a / (x - lam) + b     x: the prefill share (percent of the device's compute);
                                    lam: the M/M/1 queue's term (100 x request rate x latency
                                    at the whole device), so TTFT grows without bound as x
                                    falls to lam
    TPOT(y) = a / y + b             y: the decode share; decode does not queue

TPOT is linear in 1/y: ordinary least squares. TTFT is linear in 1/(x - lam) once lam is fixed,
so lam is searched on a grid over [0, smallest x observed), refined around the best point a few
times, with each lam's (a, b) in closed form; the lam of least squared error wins. A fit in
which latency does not fall as the share grows (a <= 0) explains nothing: no model (None), and
the controller then moves by one step on the observation alone.

TTFT needs points at three distinct shares at least, TPOT at two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# A lam grid of this many points, refined this many times around the best one.
_GRID = 64
_REFINES = 4


@dataclass(frozen=True, slots=True)
class TTFTModel:
    a: float
    lam: float
    b: float
    r2: float  # of the fit, over the points it was fitted to

    def __call__(self, prefill_share: float) -> float:
        if prefill_share <= self.lam:
            return math.inf  # the queue never drains
        return self.a / (prefill_share - self.lam) + self.b


@dataclass(frozen=True, slots=True)
class TPOTModel:
    a: float
    b: float
    r2: float

    def __call__(self, decode_share: float) -> float:
        return math.inf if decode_share <= 0 else self.a / decode_share + self.b


def fit_tpot(points: Sequence[tuple[float, float]]) -> TPOTModel | None:
    """`points`: (decode share, TPOT seconds)."""
    shares = np.array([p[0] for p in points], dtype=np.float64)
    latency = np.array([p[1] for p in points], dtype=np.float64)
    if len(np.unique(shares)) < 2 or np.any(shares <= 0):
        return None
    a, b, sse = _line(1.0 / shares[None, :], latency)
    if a[0] <= 0:
        return None
    return TPOTModel(float(a[0]), float(b[0]), _r2(float(sse[0]), latency))


def fit_ttft(points: Sequence[tuple[float, float]]) -> TTFTModel | None:
    """`points`: (prefill share, TTFT seconds)."""
    shares = np.array([p[0] for p in points], dtype=np.float64)
    latency = np.array([p[1] for p in points], dtype=np.float64)
    if len(np.unique(shares)) < 3 or np.any(shares <= 0):
        return None
    top = float(shares.min()) * (1.0 - 1e-6)
    lo, hi = 0.0, top
    best = 0
    lams = np.zeros(1)
    a = b = sse = np.zeros(1)
    for _ in range(_REFINES + 1):
        lams = np.linspace(lo, hi, _GRID)
        a, b, sse = _line(1.0 / (shares[None, :] - lams[:, None]), latency)
        sse = np.where(a > 0, sse, np.inf)
        best = int(np.argmin(sse))
        if not np.isfinite(sse[best]):
            return None
        width = (hi - lo) / (_GRID - 1)
        lo, hi = max(0.0, lams[best] - width), min(top, lams[best] + width)
    return TTFTModel(
        float(a[best]), float(lams[best]), float(b[best]), _r2(float(sse[best]), latency)
    )


def _line(u: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares of t = a * u + b for every row of `u` [G, N]: (a, b, squared error) [G]."""
    u_mean = u.mean(axis=1, keepdims=True)
    t_mean = t.mean()
    du = u - u_mean
    var = (du * du).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(var > 0, (du * (t - t_mean)).sum(axis=1) / var, 0.0)
    b = t_mean - a * u_mean[:, 0]
    residual = t[None, :] - (a[:, None] * u + b[:, None])
    return a, b, (residual * residual).sum(axis=1)


def _r2(sse: float, latency: np.ndarray) -> float:
    total = float(((latency - latency.mean()) ** 2).sum())
    return 1.0 if total == 0.0 else 1.0 - sse / total
