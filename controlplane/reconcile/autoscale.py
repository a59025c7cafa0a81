"""The autoscaling policy: a pure function from a deployment's load and timers to its replicas.

`decide(ctx)` returns a `Decision` (the desired replicas, why, the timers to carry to the next
tick, whether to preload the model on the nodes); `controlplane/reconcile/autoscaler.py` applies
it. The rules (docs/scaling.md, "Autoscaling"):

- load = requests in flight on the accepting instances of the deployment's group being decided
  (the control plane's own counts: running plus queued inside the instance) + requests waiting
  for that group at the activator; each group of a deployment (reconcile/groups.py) is decided
  on its own, with its own state;
- wanted = ceil(load / target_concurrency), within [min_replicas, max_replicas];
- the last replica stays until the deployment has had no load for `scale_to_zero_after_s`;
- from zero (no ready instance and requests waiting): wanted at once, no delay;
- up: wanted > current on every tick for `upscale_delay_s` -> the lowest wanted seen meanwhile;
- down: wanted < current on every tick for `downscale_delay_s` -> the highest wanted seen
  meanwhile; one replica goes to zero at once when the keep-alive has run out.

A tick that does not point the same way resets the timer: load that hovers around a boundary
changes nothing (the hysteresis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Peers' defaults (docs/scaling.md): Ray Serve's target_ongoing_requests, upscale_delay_s and
# downscale_delay_s; Knative's stable window as the keep-alive before zero.
DEFAULT_TARGET_CONCURRENCY = 2.0
DEFAULT_UPSCALE_DELAY_S = 30.0
DEFAULT_DOWNSCALE_DELAY_S = 600.0
DEFAULT_SCALE_TO_ZERO_AFTER_S = 60.0
MAX_REPLICAS = 256
# Load at this fraction of the capacity of the current replicas predicts a scale-up: the
# model is preloaded on the nodes before the upscale delay runs out.
PRELOAD_AT_FRACTION = 0.8


@dataclass(slots=True, frozen=True)
class AutoscaleConfig:
    min_replicas: int = 0
    max_replicas: int = 1
    target_concurrency: float = DEFAULT_TARGET_CONCURRENCY
    upscale_delay_s: float = DEFAULT_UPSCALE_DELAY_S
    downscale_delay_s: float = DEFAULT_DOWNSCALE_DELAY_S
    scale_to_zero_after_s: float = DEFAULT_SCALE_TO_ZERO_AFTER_S

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be between 0 and max_replicas "
                f"({self.max_replicas})"
            )
        if not 1 <= self.max_replicas <= MAX_REPLICAS:
            raise ValueError(f"max_replicas must be between 1 and {MAX_REPLICAS}")
        if not self.target_concurrency > 0:
            raise ValueError("target_concurrency must be above 0")
        for name in ("upscale_delay_s", "downscale_delay_s", "scale_to_zero_after_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))


@dataclass(slots=True, frozen=True)
class AutoscaleState:
    """What the policy remembers between ticks; the initial state is `AutoscaleState()`."""

    replicas: int | None = None  # the count the timers below were measured against
    idle_since: float | None = None  # since when the deployment has had no load
    up_since: float | None = None  # since when every tick wanted more replicas
    down_since: float | None = None  # since when every tick wanted fewer
    window_bound: int | None = None  # lowest wanted since up_since, highest since down_since


@dataclass(slots=True, frozen=True)
class AutoscaleContext:
    config: AutoscaleConfig
    current: int  # the deployment's desired replicas now
    ready: int  # its instances that take requests
    inflight: int  # requests in flight on those instances
    waiting: int  # requests waiting at the activator for an instance
    now: float
    state: AutoscaleState = field(default_factory=AutoscaleState)

    @property
    def load(self) -> int:
        return self.inflight + self.waiting


@dataclass(slots=True, frozen=True)
class Decision:
    replicas: int
    reason: str
    state: AutoscaleState
    preload: bool = False


def decide(ctx: AutoscaleContext) -> Decision:
    cfg, now, current = ctx.config, ctx.now, ctx.current
    prev = ctx.state
    if prev.replicas != current:  # scaled since (by this policy or by hand): timers start over
        prev = AutoscaleState(current, prev.idle_since)
    idle_since = None if ctx.load > 0 else (prev.idle_since if prev.idle_since is not None else now)
    hold = AutoscaleState(current, idle_since)
    wanted = wanted_replicas(ctx, idle_since)

    if not cfg.min_replicas <= current <= cfg.max_replicas:
        bounds = f"bounds are {cfg.min_replicas}..{cfg.max_replicas}"
        return Decision(cfg.clamp(current), bounds, hold)
    if ctx.ready == 0 and ctx.waiting > 0 and wanted > current:
        return Decision(wanted, f"scale from zero: {ctx.waiting} requests waiting", hold)
    if wanted > current:
        since = prev.up_since if prev.up_since is not None else now
        bound = wanted if prev.up_since is None else min(wanted, prev.window_bound or wanted)
        if now - since >= cfg.upscale_delay_s:
            why = (
                f"{_load(ctx)} above {cfg.target_concurrency:g} per replica for {now - since:.0f} s"
            )
            return Decision(bound, why, hold, preload=True)
        pending = AutoscaleState(current, idle_since, up_since=since, window_bound=bound)
        return Decision(current, "", pending, preload=True)
    if wanted < current:
        if current == 1 and wanted == 0:
            idle_for = now - (idle_since if idle_since is not None else now)
            return Decision(0, f"no request for {idle_for:.0f} s (keep-alive)", hold)
        since = prev.down_since if prev.down_since is not None else now
        bound = wanted if prev.down_since is None else max(wanted, prev.window_bound or 0)
        if now - since >= cfg.downscale_delay_s:
            why = (
                f"{_load(ctx)} below {cfg.target_concurrency:g} per replica for {now - since:.0f} s"
            )
            return Decision(bound, why, hold)
        pending = AutoscaleState(current, idle_since, down_since=since, window_bound=bound)
        return Decision(current, "", pending)
    return Decision(current, "", hold, preload=_near_capacity(ctx))


def _load(ctx: AutoscaleContext) -> str:
    return f"load {ctx.load} on {ctx.current}"


def wanted_replicas(ctx: AutoscaleContext, idle_since: float | None) -> int:
    """ceil(load / target) within the bounds; the last replica stays through the keep-alive."""
    cfg = ctx.config
    wanted = cfg.clamp(math.ceil(ctx.load / cfg.target_concurrency))
    if wanted == 0 and ctx.current > 0:
        idle_for = 0.0 if idle_since is None else ctx.now - idle_since
        if idle_for < cfg.scale_to_zero_after_s:
            return 1
    return wanted


def _near_capacity(ctx: AutoscaleContext) -> bool:
    capacity = ctx.current * ctx.config.target_concurrency
    return ctx.current < ctx.config.max_replicas and ctx.load >= PRELOAD_AT_FRACTION * capacity > 0


def inputs(ctx: AutoscaleContext) -> dict[str, Any]:
    """The inputs of a decision, as recorded with it."""
    cfg = ctx.config
    return {
        "load": ctx.load,
        "inflight": ctx.inflight,
        "waiting": ctx.waiting,
        "ready": ctx.ready,
        "current": ctx.current,
        "min_replicas": cfg.min_replicas,
        "max_replicas": cfg.max_replicas,
        "target_concurrency": cfg.target_concurrency,
        "upscale_delay_s": cfg.upscale_delay_s,
        "downscale_delay_s": cfg.downscale_delay_s,
        "scale_to_zero_after_s": cfg.scale_to_zero_after_s,
        "idle_since": ctx.state.idle_since,
        "up_since": ctx.state.up_since,
        "down_since": ctx.state.down_since,
    }
