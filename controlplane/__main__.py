"""`python -m controlplane`: run the control plane on uvicorn."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from controlplane.app import create_app
from controlplane.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m controlplane")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8480)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings.from_env(host=args.host, port=args.port, database_url=args.database_url)
    app = create_app(settings)
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=10
    )


if __name__ == "__main__":
    main()
