"""Serving a FlowServe instance inside a process that was started before its model was known:
a warm pod (`pod.py`) or a zygote's forked child (`zygote.py`).

Both parse the same `python -m dataplane.flowserve` flags the cold path runs and end in the same
`serve`, so an instance behaves the same whichever path started it; only the startup marks and
where the weights come from differ.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from dataplane.flowserve.startup import LaunchPath, StartupClock
from dataplane.scaleout.protocol import StartCommand

if TYPE_CHECKING:
    import torch

    from dataplane.flowserve.config import EngineConfig


def warm_imports() -> None:
    """Import what an instance needs before it knows its model: torch, transformers (with the
    config classes AutoTokenizer would otherwise import on its first call, about as long again
    as transformers itself), uvicorn (with what it imports only once a server starts), the
    engine and its server."""
    import anyio._backends._asyncio  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import uvicorn  # noqa: F401
    import uvicorn.lifespan.on  # noqa: F401
    import uvicorn.loops.asyncio  # noqa: F401
    import uvicorn.protocols.http.h11_impl  # noqa: F401
    from transformers import (  # noqa: F401
        LlamaConfig,
        MistralConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
    )

    import dataplane.flowserve.__main__  # noqa: F401
    import dataplane.flowserve.engine  # noqa: F401
    import dataplane.flowserve.server  # noqa: F401


def init_device(cache_dir: str | Path | None = None) -> str:
    """Bring up the device an engine would pick (a CUDA context costs seconds); its kind. On
    CUDA, with `cache_dir` (the node's DRAM cache), also map and register its entries, so that
    the one this process is handed uploads in one DMA (`registered_cache`: what that pins)."""
    import torch

    from dataplane.flowserve.config import resolve_device

    device = resolve_device(None)
    if device.type != "cpu":
        torch.empty(1, device=device)
    if device.type == "cuda":
        from dataplane.flowserve import device_upload

        device_upload.prepare()  # the pinned staging ring, for an entry not registered
        if cache_dir is not None:
            register_ahead(cache_dir)
    return device.type


def register_ahead(cache_dir: str | Path) -> None:
    """Register the cache's entries within $DEEPFLOW_REGISTER_AHEAD_BYTES; one line on
    stderr (the pod's log) says what."""
    from dataplane.flowserve import registered_cache

    started = time.perf_counter()
    registered = registered_cache.register_entries(cache_dir, registered_cache.budget_from_env())
    gib = sum(r.nbytes for r in registered) / 2**30
    print(
        f"registered {len(registered)} DRAM cache entries of {cache_dir} ahead ({gib:.2f} GiB) "
        f"in {time.perf_counter() - started:.2f} s",
        file=sys.stderr,
        flush=True,
    )


def redirect_output(log_path: str, header: str) -> None:
    """Send this process's stdout and stderr to the instance's log, as the agent does for a
    cold instance, so its log is in the same place whichever path started it."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    os.write(fd, f"=== {stamp} {header}\n".encode())
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def prepare(command: StartCommand) -> tuple[argparse.Namespace, EngineConfig]:
    """Parse the instance's flags as the cold path would. Raises ValueError for bad ones."""
    from dataplane.flowserve.__main__ import engine_config, parse_args
    from dataplane.flowserve.errors import FlowServeError

    try:
        args = parse_args(command.flowserve_argv())
    except SystemExit as exc:  # argparse has printed why
        raise ValueError(f"bad engine arguments for instance {command.instance_id}") from exc
    try:
        return args, engine_config(args)
    except FlowServeError as exc:
        raise ValueError(str(exc)) from exc


def serve(
    args: argparse.Namespace,
    config: EngineConfig,
    clock: StartupClock,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> int:
    """Serve until SIGTERM; the exit code. The engine is the one the flags ask for, as on the
    cold path (`open_engine`: semi-PD's two workers under `--semi-pd`)."""
    from dataplane.flowserve import __main__ as flowserve_main
    from dataplane.flowserve.engine import open_engine

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s", force=True
    )
    return flowserve_main.serve(args, lambda: open_engine(config, weights=weights), clock)


def clock_for(
    command: StartCommand, path: LaunchPath, pod_at: float, runtime_at: float
) -> StartupClock:
    # Weights from a peer on the GPU are the launcher's `ipc` path, whatever process serves it.
    path = "ipc" if command.weights_peer is not None else path
    return StartupClock(path, command.requested_at, pod_at, runtime_at)
