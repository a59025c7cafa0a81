"""`python -m dataplane.training --spec SPEC.json`: see the package docstring for the protocol."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from types import FrameType
from typing import Any

from pydantic import BaseModel

from controlplane.wire import TrainingStart

EXIT_STOPPED = 128 + signal.SIGTERM


def emit(kind: str, message: BaseModel | dict[str, Any]) -> None:
    body = message.model_dump(mode="json") if isinstance(message, BaseModel) else message
    sys.stdout.write(json.dumps({"type": kind, **body}) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataplane.training")
    parser.add_argument("--spec", required=True, help="a TrainingStart as JSON")
    args = parser.parse_args(argv)

    stop_requested = False

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with open(args.spec, encoding="utf-8") as f:
            spec = TrainingStart.model_validate_json(f.read())
        from .trainer import run  # torch, transformers and peft: seconds to import

        result = run(spec, emit, lambda: stop_requested)
    except Exception as e:  # the protocol's error line is the report; the agent has no stderr
        emit("error", {"message": f"{type(e).__name__}: {e}"})
        return 1
    if result is None:
        return EXIT_STOPPED
    emit("result", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
