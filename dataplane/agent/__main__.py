"""`python -m dataplane.agent --control-plane URL --host H --port P [--name NAME]`."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from dataplane.agent.app import create_app
from dataplane.agent.settings import AgentSettings, deepflow_home, default_name


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
