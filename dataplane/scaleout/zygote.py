"""`python -m dataplane.scaleout.zygote --model DIR --control-fd N [...]`: one model's zygote.

The CPU analogue of NPU-fork (docs/scaling.md): a process that holds one model's weights, mapped
from the node's DRAM cache (preloading them first if the cache lacks them), and forks a child per
new instance. The child inherits the imports, the warmed-up runtime and the mapping: it builds
its engine over the parent's weight tensors (the same physical pages), allocates its own KV cache
and serves on its port. The zygote reaps its children and reports each exit.

Fork and threads do not mix: a child inherits only the forking thread, and libgomp's thread pool
breaks in a child whose parent ever ran an OpenMP parallel region. So the zygote runs torch with
one thread (no parallel region ever starts), never starts a thread of its own (one select loop),
and refuses to fork if anything started one anyway. Each child sets its torch threads itself.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, NoReturn, cast

from dataplane.scaleout.protocol import Channel, StartCommand

if TYPE_CHECKING:
    import torch

    from dataplane.scaleout.dram_cache import CacheEntry

REAP_INTERVAL_S = 0.05
PR_SET_PDEATHSIG = 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataplane.scaleout.zygote")
    parser.add_argument("--model", required=True, help="a local Hugging Face model folder")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--cache-dir", default=None, help="the node's DRAM cache")
    parser.add_argument("--cache-budget", type=int, default=None, help="bytes")
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args(argv)
    channel = Channel.from_fd(args.control_fd)
    try:
        weights, entry = _load(args)
    except Exception as exc:  # reported, then this zygote is gone: the launcher falls back
        channel.send({"event": "failed", "message": f"{type(exc).__name__}: {exc}"})
        return 1
    # Objects alive now are never collected in the children, so a child's GC pass does not
    # write to (and so copy) the pages holding them.
    gc.collect()
    gc.freeze()
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        channel.send({"event": "failed", "message": f"{threads} threads; forking is unsafe"})
        return 1
    channel.send(
        {
            "event": "ready",
            "pid": os.getpid(),
            "entry": entry.name,
            "nbytes": entry.nbytes,
            "dtype": entry.dtype,
        }
    )
    _serve_forks(channel, weights)
    return 0


def _load(args: argparse.Namespace) -> tuple[Mapping[str, torch.Tensor], CacheEntry]:
    import torch

    torch.set_num_threads(1)  # before any op: no OpenMP parallel region, ever
    from dataplane.flowserve import weights_cache
    from dataplane.scaleout import runtime
    from dataplane.scaleout.dram_cache import DramCache

    runtime.warm_imports()
    if runtime.init_device() != "cpu":
        raise RuntimeError("a zygote forks CPU instances only (a device context cannot fork)")
    entry = DramCache(args.cache_dir, args.cache_budget).preload(args.model, args.dtype)
    mapped = weights_cache.map_entry(entry.path)
    if mapped is None:
        raise RuntimeError(f"the cache entry {entry.path} went away while mapping it")
    _warm_up(args.model, entry.dtype, mapped.tensors)
    return mapped.tensors, entry  # the flock stays held: the entry is pinned


def _warm_up(model_path: str, dtype: str, weights: Mapping[str, torch.Tensor]) -> None:
    """One step of a throwaway engine over the weights, on this one thread: what torch and
    the engine set up lazily on first use is then set up once, here, for every child."""
    from dataplane.flowserve.config import DType, EngineConfig
    from dataplane.flowserve.engine import Engine
    from dataplane.flowserve.sampling_params import SamplingParams

    config = EngineConfig(
        model_path,
        dtype=cast(DType, dtype),
        device="cpu",
        max_model_len=32,
        kv_cache_bytes=1 << 20,
    )
    engine = Engine(config, weights=weights)
    engine.add_request("warm-up", [0, 1], SamplingParams(max_tokens=1))
    while engine.has_unfinished():
        engine.step()


def _serve_forks(channel: Channel, weights: Mapping[str, torch.Tensor]) -> None:
    zygote_pid = os.getpid()
    while True:
        ready = channel.has_buffered() or select.select([channel], [], [], REAP_INTERVAL_S)[0]
        if ready:
            message = channel.recv()
            if message is None or message.get("op") == "exit":
                return  # the children get SIGTERM from PR_SET_PDEATHSIG
            if message.get("op") == "fork":
                command = StartCommand.from_json(message["start"])
                try:
                    pid = os.fork()
                except OSError as exc:
                    channel.send({"event": "error", "id": message["id"], "message": str(exc)})
                    continue
                if pid == 0:
                    _child(command, weights, channel, zygote_pid)
                channel.send({"event": "forked", "id": message["id"], "pid": pid})
        _reap(channel)


def _reap(channel: Channel) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        channel.send({"event": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status)})


def _child(
    command: StartCommand,
    weights: Mapping[str, torch.Tensor],
    channel: Channel,
    zygote_pid: int,
) -> NoReturn:
    """The forked instance: never returns into the zygote's loop."""
    code = 1
    try:
        pod_at = time.time()
        os.setsid()  # a process group of its own, which stop() signals
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != zygote_pid:  # the zygote died before prctl took effect
            os._exit(1)
        channel.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        from dataplane.scaleout import runtime

        runtime.redirect_output(command.log_path, f"fork {os.getpid()}: {command.instance_id}")
        import torch

        torch.set_num_threads(command.torch_threads or 1)
        flags, config = runtime.prepare(command)
        code = runtime.serve(
            flags, config, runtime.clock_for(command, "fork", pod_at, pod_at), weights
        )
    except BaseException:  # noqa: B036 (whatever happens, the child must not return)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
