"""`python -m dataplane.agent --control-plane URL --host H --port P [--name NAME]`."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import uvicorn

from dataplane.agent.app import create_app
from dataplane.agent.settings import AgentSettings, deepflow_home, default_name
from dataplane.scaleout.settings import CACHE_ROOT_ENV

# Fast scale-out (docs/scaling.md): each flag's default comes from its variable.
WARM_POOL_ENV = "DEEPFLOW_WARM_POOL_SIZE"
CACHE_BUDGET_ENV = "DEEPFLOW_CACHE_BUDGET"
ZYGOTES_ENV = "DEEPFLOW_ZYGOTES"
TORCH_THREADS_ENV = "DEEPFLOW_INSTANCE_TORCH_THREADS"
DEFAULT_WARM_POOL_SIZE = 2
ZYGOTE_MODES = {"auto": None, "on": True, "off": False}


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dataplane.agent", description=__doc__)
    parser.add_argument("--control-plane", required=True, help="control plane URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8481)
    parser.add_argument("--name", default=None, help="node name (default: the host name)")
    parser.add_argument(
        "--url",
        default=None,
        help="URL the control plane calls this agent at (default: http://HOST:PORT)",
    )
    parser.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=5.0,
        help="seconds each call to the control plane (register, heartbeat, report) may take",
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=300.0,
        help="seconds an instance has to become healthy",
    )
    parser.add_argument(
        "--stop-grace",
        type=float,
        default=10.0,
        help="seconds between SIGTERM and SIGKILL when stopping an instance",
    )
    pool_size = _env_int(WARM_POOL_ENV)
    parser.add_argument(
        "--warm-pool-size",
        type=int,
        default=DEFAULT_WARM_POOL_SIZE if pool_size is None else pool_size,
        help=f"pre-warmed pods kept ready (${WARM_POOL_ENV}, default {DEFAULT_WARM_POOL_SIZE})",
    )
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get(CACHE_ROOT_ENV) or None,
        help=f"the DRAM preload cache (${CACHE_ROOT_ENV}, default /dev/shm/deepflow-cache)",
    )
    parser.add_argument(
        "--cache-budget",
        type=int,
        default=_env_int(CACHE_BUDGET_ENV),
        help=f"bytes the DRAM cache may hold (${CACHE_BUDGET_ENV}, default half its filesystem)",
    )
    parser.add_argument(
        "--zygotes",
        choices=sorted(ZYGOTE_MODES),
        default=os.environ.get(ZYGOTES_ENV) or "auto",
        help=f"keep zygotes of preloaded models to fork from (${ZYGOTES_ENV}; auto: on CPU nodes)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=_env_int(TORCH_THREADS_ENV),
        help=f"torch threads per instance (${TORCH_THREADS_ENV}; default 1 when forked, "
        "else torch's own)",
    )
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> AgentSettings:
    advertised_host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    return AgentSettings(
        control_plane_url=args.control_plane,
        url=args.url or f"http://{advertised_host}:{args.port}",
        name=args.name or default_name(),
        home=deepflow_home(),
        request_timeout_s=args.heartbeat_timeout,
        start_timeout_s=args.start_timeout,
        stop_grace_s=args.stop_grace,
        warm_pool_size=args.warm_pool_size,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        cache_budget_bytes=args.cache_budget,
        zygotes=ZYGOTE_MODES[args.zygotes],
        torch_threads=args.torch_threads,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings_from(args))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
