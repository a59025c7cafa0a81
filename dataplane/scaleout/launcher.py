"""The node agent's one call to start an instance, by the fastest path available:

    fork      a zygote of the model exists (CPU): fork it; the child shares the weights' pages
    ipc       an instance of the model runs on this GPU (CUDA): the new one (in a warm pod if
              one is ready, else a new process) takes the weights from it through CUDA IPC,
              copied device-to-device (`peer_import="copy"`) or opened in place ("share");
              cuda_share.py
    warm_pod  a pre-warmed pod is ready: hand it the instance; it maps the weights from the
              node's DRAM cache when the cache holds them, else reads the folder
    cold      `python -m dataplane.flowserve ...`, the command dataplane/agent/launch.py builds

A path that is unavailable or fails is passed over, and why is kept in `handle.fallbacks`.
Every CUDA instance the launcher starts exports its weights on a socket of its own (unless its
weights are another's, opened in place), so each can seed the next.

    launcher = Launcher(log_dir=..., cache_dir=..., pool=WarmPool(2, log_dir=...))
    launcher.pool.start()                        # when there is a pool
    launcher.start_zygote(model_path)            # for a model expected to scale out (blocks)
    handle = launcher.launch(start, port)        # InstanceStart + a free port; returns at once
    startup = handle.wait_ready()                # or poll /health as the supervisor does
    handle.stop()                                # SIGTERM, grace, SIGKILL
    launcher.close()                             # zygotes and idle pods; not the instances

Preloading a model into the DRAM cache imports torch; an agent that does not want torch in its
own process runs `preload_command(...)` as a child instead of calling `DramCache.preload`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Literal

from controlplane.wire import InstanceStart
from dataplane.agent.launch import check_start
from dataplane.agent.process import child_env
from dataplane.flowserve.startup import LAUNCHED_AT_ENV, LaunchPath
from dataplane.scaleout.errors import PodUnavailable, ScaleOutError, ZygoteUnavailable
from dataplane.scaleout.fork import Zygote
from dataplane.scaleout.handles import InstanceHandle, ProcessHandle
from dataplane.scaleout.pool import WarmPool
from dataplane.scaleout.protocol import StartCommand
from dataplane.scaleout.settings import default_cache_root, share_socket_dir

log = logging.getLogger(__name__)

ALL_PATHS: tuple[LaunchPath, ...] = ("fork", "ipc", "warm_pod", "cold")


class Launcher:
    def __init__(
        self,
        *,
        log_dir: Path,
        host: str = "127.0.0.1",
        cache_dir: str | Path | None = None,
        pool: WarmPool | None = None,
        torch_threads: int | None = None,
        pod_wait_s: float = 0.0,
        peer_import: Literal["copy", "share"] = "copy",
    ) -> None:
        """`cache_dir`: the node's DRAM cache (None: warm pods and zygotes use the default,
        settings.default_cache_root()). `torch_threads`: per instance, every path (None: torch's
        default for cold and warm pods, 1 for forked children). `pod_wait_s`: how long to wait
        for a booting pod when none is ready. `peer_import`: how an `ipc` instance takes a
        peer's weights: a device copy of its own (the default: it outlives the peer) or the
        peer's memory itself (no extra GPU memory, but it must not outlive the peer)."""
        self.log_dir = log_dir
        self.host = host
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.pool = pool
        self.torch_threads = torch_threads
        self.pod_wait_s = pod_wait_s
        self.peer_import = peer_import
        self._zygotes: dict[str, Zygote] = {}
        self._peers: dict[tuple[str, str], list[tuple[InstanceHandle, str]]] = {}

    # -- zygotes -------------------------------------------------------------------------------

    def start_zygote(
        self,
        model_path: str,
        *,
        dtype: str | None = None,
        cache_budget: int | None = None,
        timeout_s: float = 300.0,
    ) -> Zygote:
        """Start (or return the running) zygote of a model. Blocks until it holds the weights;
        raises ZygoteUnavailable if it cannot."""
        key = _key(model_path)
        zygote = self._zygotes.get(key)
        if zygote is not None and zygote.alive():
            return zygote
        zygote = Zygote.start(
            model_path,
            log_dir=self.log_dir,
            cache_dir=self.cache_dir,
            cache_budget=cache_budget,
            dtype=dtype,
            timeout_s=timeout_s,
        )
        self._zygotes[key] = zygote
        return zygote

    def stop_zygote(self, model_path: str) -> None:
        zygote = self._zygotes.pop(_key(model_path), None)
        if zygote is not None:
            zygote.close()

    def zygote_for(self, start: InstanceStart) -> Zygote | None:
        """The live zygote that can fork this instance: same model, CPU, same dtype."""
        zygote = self._zygotes.get(_key(start.model_path))
        if zygote is None or not zygote.alive():
            return None
        device = start.engine_args.get("device")
        dtype = start.engine_args.get("dtype")
        if device not in (None, "cpu") or dtype not in (None, zygote.resolved_dtype):
            return None
        return zygote

    # -- launching -----------------------------------------------------------------------------

    def launch(
        self, start: InstanceStart, port: int, *, paths: Collection[LaunchPath] = ALL_PATHS
    ) -> InstanceHandle:
        """Start the instance on `port` by the first path of `paths` (in the order fork, ipc,
        warm_pod, cold) that works. Raises InvalidStart for a bad start, and OSError when even
        the cold path cannot spawn."""
        check_start(start)
        requested_at = time.time()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        command = StartCommand.of(
            start,
            port,
            host=self.host,
            log_path=str(self.log_dir / f"{start.instance_id}.log"),
            requested_at=requested_at,
            torch_threads=self.torch_threads,
        )
        cuda = wants_cuda(start)
        if cuda:
            socket_path = share_socket(start.instance_id, port)
            command = dataclasses.replace(command, share_socket=socket_path)
        fallbacks: list[str] = []
        handle: InstanceHandle | None = None
        if "fork" in paths:
            handle = self._try_fork(start, command, fallbacks)
        if handle is None and "ipc" in paths and cuda:
            handle = self._try_ipc(start, command, fallbacks)
        if handle is None and "warm_pod" in paths:
            handle = self._try_warm_pod(command, fallbacks)
        if handle is None:
            if "cold" not in paths:
                raise ScaleOutError("; ".join(fallbacks) or "no launch path allowed")
            handle = spawn_cold(command)
        handle.fallbacks = fallbacks
        handle.dispatched_at = time.time()
        if cuda and not (handle.path == "ipc" and self.peer_import == "share"):
            assert command.share_socket is not None
            self._peers.setdefault(_peer_key(start), []).append((handle, command.share_socket))
        log.info(
            "instance %s: %s (pid %d)%s",
            start.instance_id,
            handle.path,
            handle.pid,
            f"; passed over: {'; '.join(fallbacks)}" if fallbacks else "",
        )
        return handle

    def close(self) -> None:
        """Stop the zygotes and the pool's idle pods. Instances are the caller's to stop
        (a forked one still running gets SIGTERM when its zygote goes)."""
        for key in list(self._zygotes):
            self._zygotes.pop(key).close()
        if self.pool is not None:
            self.pool.close()

    def _try_fork(
        self, start: InstanceStart, command: StartCommand, fallbacks: list[str]
    ) -> InstanceHandle | None:
        zygote = self.zygote_for(start)
        if zygote is None:
            fallbacks.append("fork: no zygote of this model (CPU, same dtype)")
            return None
        try:
            return zygote.fork(command)
        except ZygoteUnavailable as exc:
            fallbacks.append(f"fork: {exc}")
            return None

    def peer_for(self, start: InstanceStart) -> str | None:
        """The weight socket of a live instance this launcher started with the same model and
        dtype, once it exports (its socket appears when its weights are loaded)."""
        peers = self._peers.get(_peer_key(start))
        if not peers:
            return None
        peers[:] = [(handle, path) for handle, path in peers if handle.alive()]
        return next((path for _, path in peers if Path(path).exists()), None)

    def _try_ipc(
        self, start: InstanceStart, command: StartCommand, fallbacks: list[str]
    ) -> InstanceHandle | None:
        peer = self.peer_for(start)
        if peer is None:
            fallbacks.append("ipc: no instance of this model exports its weights on this node")
            return None
        cache = self.cache_dir if self.cache_dir is not None else str(default_cache_root())
        command = dataclasses.replace(
            command,
            weights_peer=peer,
            weights_peer_mode=self.peer_import,
            weights_cache=cache,  # should the peer go away first
            share_socket=None if self.peer_import == "share" else command.share_socket,
        )
        pod = self.pool.take(0.0) if self.pool is not None else None
        handle: InstanceHandle | None = None
        if pod is not None:
            try:
                handle = pod.start_instance(command)
            except PodUnavailable as exc:
                fallbacks.append(f"ipc: {exc}; in a new process instead")
        if handle is None:
            handle = spawn_cold(command)
        handle.path = "ipc"
        return handle

    def _try_warm_pod(self, command: StartCommand, fallbacks: list[str]) -> InstanceHandle | None:
        pod = self.pool.take(self.pod_wait_s) if self.pool is not None else None
        if pod is None:
            fallbacks.append("warm_pod: no pod ready" if self.pool else "warm_pod: no pool")
            return None
        cache = self.cache_dir if self.cache_dir is not None else str(default_cache_root())
        try:
            return pod.start_instance(dataclasses.replace(command, weights_cache=cache))
        except PodUnavailable as exc:
            fallbacks.append(f"warm_pod: {exc}")
            return None


def spawn_cold(command: StartCommand) -> ProcessHandle:
    """Today's instance process, with the launch time in its environment for its startup
    marks, in a session of its own like the agent's (dataplane/agent/process.py)."""
    argv = [sys.executable, "-m", "dataplane.flowserve", *command.flowserve_argv()]
    env = child_env(os.environ)
    env[LAUNCHED_AT_ENV] = repr(command.requested_at)
    if command.torch_threads is not None:
        env["OMP_NUM_THREADS"] = str(command.torch_threads)
    with open(command.log_path, "ab") as out:
        out.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    return ProcessHandle(
        instance_id=command.instance_id,
        path="cold",
        pid=proc.pid,
        url=f"http://{command.host}:{command.port}",
        log_path=command.log_path,
        requested_at=command.requested_at,
        dispatched_at=time.time(),
        proc=proc,
    )


def preload_command(
    model_path: str, *, cache_dir: str | None = None, dtype: str | None = None
) -> list[str]:
    """argv that preloads a model into the node's DRAM cache in a child process."""
    argv = [sys.executable, "-m", "dataplane.scaleout.dram_cache"]
    if cache_dir is not None:
        argv += ["--root", cache_dir]
    argv += ["preload", model_path]
    return argv + (["--dtype", dtype] if dtype is not None else [])


def _key(model_path: str) -> str:
    return str(Path(model_path).resolve())


def _peer_key(start: InstanceStart) -> tuple[str, str]:
    return _key(start.model_path), str(start.engine_args.get("dtype") or "bfloat16")


def wants_cuda(start: InstanceStart) -> bool:
    """The instance will run on a CUDA GPU: asked for, or left to FlowServe on a node with an
    NVIDIA driver (checked without importing torch)."""
    device = start.engine_args.get("device")
    return device == "cuda" or (device is None and Path("/dev/nvidiactl").exists())


def share_socket(instance_id: str, port: int) -> str:
    """The instance's weight socket: short (a Unix socket's path is at most 107 bytes), and a
    restart of the same id on another port does not take over a live predecessor's."""
    name = hashlib.sha256(f"{instance_id}:{port}".encode()).hexdigest()[:16]
    return str(share_socket_dir() / f"{name}.sock")
