"""`python -m dataplane.flowserve --model PATH --port P [...]`: one FlowServe instance."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import transformers
import uvicorn

from dataplane.flowserve.config import DTYPES, EngineConfig
from dataplane.flowserve.engine import Engine, open_engine
from dataplane.flowserve.errors import FlowServeError
from dataplane.flowserve.kv_transfer import KVTransferConfig
from dataplane.flowserve.server import create_app
from dataplane.flowserve.startup import (
    LaunchPath,
    StartupClock,
    launched_at,
    process_started_at,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dataplane.flowserve", description=__doc__)
    parser.add_argument("--model", required=True, help="a local Hugging Face model folder")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--instance-id", default=None)
    parser.add_argument(
        "--role",
        choices=["colocated", "prefill", "decode"],
        default="colocated",
        help="its group in a PD-disaggregated deployment (reported by /health; docs/pd.md)",
    )
    parser.add_argument("--model-name", default=None, help="reported name (default: the folder's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--device", choices=["cpu", "cuda", "npu"], default=None)
    parser.add_argument(
        "--enforce-eager", action="store_true", help="no decode graphs (kernels stay the same)"
    )
    parser.add_argument(
        "--memory-profile", default=None, help="a JSON file to keep the activation profile in"
    )
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=2048, help="token budget of one step"
    )
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--kv-cache-memory", type=int, default=None, help="KV cache budget in bytes"
    )
    budget.add_argument(
        "--kv-cache-fraction",
        type=float,
        default=None,
        help="KV cache budget as a fraction of free memory (default 0.1 on CPU, 0.85 on CUDA)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--weights-from-cache",
        default=None,
        metavar="DIR",
        help="a DRAM preload cache (docs/scaling.md): map the weights from it when it holds them",
    )
    parser.add_argument(
        "--weights-from-instance",
        default=None,
        metavar="SOCKET",
        help="a running instance's weight socket on this GPU: take the weights from it first",
    )
    parser.add_argument(
        "--weights-import",
        choices=["copy", "share"],
        default="copy",
        help="copy the peer's weights device-to-device, or open its memory in place (zero copy)",
    )
    parser.add_argument(
        "--share-weights",
        default=None,
        metavar="SOCKET",
        help="once loaded, export this instance's CUDA weights to new instances on this socket",
    )
    parser.add_argument(
        "--graceful-timeout",
        type=int,
        default=8,
        help="seconds in-flight streams get to finish after SIGTERM (below the agent's 10 s grace)",
    )
    parser.add_argument(
        "--kv-dir",
        default=None,
        help="where exported K/V wait for an shm transfer (default /dev/shm/deepflow-kv)",
    )
    parser.add_argument(
        "--kv-ttl", type=float, default=60.0, help="seconds an unfetched K/V transfer is kept"
    )
    parser.add_argument(
        "--kv-max-bytes", type=int, default=8 << 30, help="unfetched K/V held at most, in bytes"
    )
    parser.add_argument(
        "--kv-fetch-timeout", type=float, default=30.0, help="seconds to fetch imported K/V"
    )
    semi_pd = parser.add_argument_group("semi-PD (docs/flowserve.md)")
    semi_pd.add_argument(
        "--semi-pd",
        action="store_true",
        help="run prefill and decode as two workers on their own shares of the device",
    )
    semi_pd.add_argument("--slo-ttft-ms", type=float, default=None, help="P90 TTFT target")
    semi_pd.add_argument("--slo-tpot-ms", type=float, default=None, help="P90 TPOT target")
    semi_pd.add_argument(
        "--semi-pd-split",
        type=int,
        default=50,
        metavar="P",
        help="the prefill worker's share of the device's compute to start with, percent",
    )
    semi_pd.add_argument(
        "--semi-pd-static", action="store_true", help="keep the split (SLOs are only observed)"
    )
    semi_pd.add_argument(
        "--semi-pd-window",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how often the SLO controller may change the split",
    )
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args(argv)


def _after_graceful_shutdown(signum: int, frame: FrameType | None) -> None:
    """Uvicorn's own handlers replace this one while it serves."""


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """Raises FlowServeError for a bad combination."""
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_cache_bytes=args.kv_cache_memory,
        kv_cache_fraction=args.kv_cache_fraction,
        seed=args.seed,
        weights_cache=args.weights_from_cache,
        weights_peer=args.weights_from_instance,
        weights_peer_mode=args.weights_import,
        enforce_eager=args.enforce_eager,
        memory_profile=args.memory_profile,
        semi_pd=args.semi_pd,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        semi_pd_split=args.semi_pd_split,
        semi_pd_static=args.semi_pd_static,
        semi_pd_window_s=args.semi_pd_window,
    )


def kv_transfer_config(args: argparse.Namespace) -> KVTransferConfig:
    """Raises ValueError for a non-positive TTL, timeout or cap."""
    return KVTransferConfig(
        Path(args.kv_dir) if args.kv_dir else KVTransferConfig.default_shm_dir(),
        ttl_s=args.kv_ttl,
        max_bytes=args.kv_max_bytes,
        fetch_timeout_s=args.kv_fetch_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    runtime_at = time.time()  # the module's imports are done
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        config = engine_config(args)
        kv_transfer_config(args)
    except (FlowServeError, ValueError) as exc:
        print(f"flowserve: {exc}", file=sys.stderr)
        return 2
    pod_at = process_started_at()
    path: LaunchPath = "ipc" if args.weights_from_instance else "cold"
    startup = StartupClock(path, launched_at(pod_at), pod_at, runtime_at)
    return serve(args, lambda: open_engine(config), startup)


def serve(
    args: argparse.Namespace, load_engine: Callable[[], Engine], startup: StartupClock
) -> int:
    """Serve until SIGTERM/SIGINT; the cold start above, a warm pod and a forked child all end
    here (dataplane.scaleout)."""
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    model_name = args.model_name or Path(args.model).resolve().name
    if args.share_weights:
        from dataplane.scaleout.cuda_share import exporting

        load_engine = exporting(load_engine, args.share_weights)
    app = create_app(
        load_engine,
        model_name=model_name,
        instance_id=args.instance_id,
        startup=startup,
        role=args.role,
        kv_transfer=kv_transfer_config(args),
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=args.graceful_timeout,
        )
    )
    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown: stop accepting, let streams finish
    # (up to the timeout), then run the lifespan's exit, which stops the engine thread. Afterwards
    # it re-raises the signal to the handler it found; a no-op one lets a drained instance exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _after_graceful_shutdown)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
