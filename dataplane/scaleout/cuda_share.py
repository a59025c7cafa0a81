"""Weights from a running instance on the same GPU: the CUDA analogue of fork (docs/scaling.md).

A CUDA context does not survive fork, so a new instance on a GPU cannot inherit a zygote's
weights. It can take them from an instance already serving that model on the same device,
through CUDA IPC: the running instance exports its weight tensors as IPC handles (torch's
own CUDA tensor sharing, `torch.multiprocessing.reductions`) on a Unix socket beside its HTTP
port, and the new instance opens them:

    share  the opened handles are its parameters: zero copy, no extra memory, but the weights
           live exactly as long as the exporting instance does
    copy   one new device buffer, filled device-to-device from the opened handles, which are
           then closed: an independent instance, at HBM speed (~1 ms per GB on an H100)

    exporter (a FlowServe instance started with --share-weights SOCKET; the socket appears once
    its weights are loaded, and goes with the process):
        client connects -> 8-byte length + pickled {"format", "device_uuid", "tensors": {name:
        reduce_tensor(t)}} -> close
    importer (--weights-from-instance SOCKET [--weights-import copy|share]):
        imported = import_weights(socket, device, dtype, mode="copy")

The payload is unpickled by an unpickler that resolves only torch's own names, and the socket
lives in a directory only its user can enter (`settings.share_socket_dir`). An instance whose
weights are themselves opened handles (share) cannot export them again (CUDA refuses IPC
handles of imported memory); a copying one can.
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import pickle
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from dataplane.scaleout.errors import ScaleOutError

if TYPE_CHECKING:
    from dataplane.flowserve.engine import Engine

log = logging.getLogger(__name__)

FORMAT = 1
ImportMode = Literal["copy", "share"]
IMPORT_MODES: tuple[ImportMode, ...] = ("copy", "share")
_LENGTH = struct.Struct("!Q")
MAX_PAYLOAD = 64 << 20
ALIGN = 256  # bytes: the copy mode's tensors start where a CUDA allocation would


class ShareError(ScaleOutError):
    """The weights could not be taken from the peer: it is gone, on another device, holds
    another dtype, or its answer was not a weight manifest. The instance falls back to the
    DRAM cache or the folder."""


@dataclass(slots=True)
class Imported:
    tensors: dict[str, torch.Tensor]
    source: Literal["cuda_ipc", "device_copy"]
    nbytes: int
    seconds: float  # connect to usable (the copy synchronised)


# -- exporting -------------------------------------------------------------------------------


def device_uuid(device: torch.device) -> str:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return str(torch.cuda.get_device_properties(index).uuid)


def manifest(tensors: Mapping[str, torch.Tensor], device: torch.device) -> bytes:
    """The handles of `tensors`, pickled. Each call takes a new reference on the producer's
    side for every storage, which the importer releases when it closes the handle."""
    from torch.multiprocessing.reductions import reduce_tensor

    handles = {name: reduce_tensor(t) for name, t in tensors.items()}  # type: ignore[no-untyped-call]
    body = {"format": FORMAT, "device_uuid": device_uuid(device), "tensors": handles}
    return pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL)


class WeightExporter:
    """Serves a manifest of `tensors` to every client of a Unix socket, from a daemon thread."""

    def __init__(
        self, tensors: Mapping[str, torch.Tensor], socket_path: str, device: torch.device
    ) -> None:
        self.tensors = dict(tensors)
        self.socket_path = socket_path
        self.device = device
        Path(socket_path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            os.unlink(socket_path)  # a stale one from a process that did not exit cleanly
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bound under a temporary name and renamed: the path appears only once it accepts.
        tmp = f"{socket_path}.{os.getpid()}.tmp"
        self._sock.bind(tmp)
        os.chmod(tmp, 0o600)
        self._sock.listen(16)
        os.rename(tmp, socket_path)
        self._thread = threading.Thread(target=self._serve, name="weight-exporter", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        if self.device.index is not None:
            torch.cuda.set_device(self.device)
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    payload = manifest(self.tensors, self.device)
                    conn.sendall(_LENGTH.pack(len(payload)) + payload)
                except Exception:  # one failed client must not end the exporter
                    log.exception("exporting weights on %s", self.socket_path)

    def close(self) -> None:
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        self._sock.close()


def exporting(load_engine: Callable[[], Engine], socket_path: str) -> Callable[[], Engine]:
    """`load_engine`, then export its weights on `socket_path` (a CUDA engine whose weights it
    owns; otherwise say why in the log and serve without exporting)."""

    def load() -> Engine:
        engine = load_engine()
        if engine.device.type != "cuda":
            log.warning("--share-weights: only CUDA weights can be shared; not exporting")
        elif engine.weights.source == "cuda_ipc":
            log.warning("--share-weights: these weights are another instance's; not exporting")
        else:
            exporter = WeightExporter(engine.weight_tensors(), socket_path, engine.device)
            atexit.register(exporter.close)  # which also keeps it alive
        return engine

    return load


# -- importing -------------------------------------------------------------------------------


class _TorchOnly(pickle.Unpickler):
    """Resolves only torch's own names: a manifest is torch's tensor reductions and nothing
    else."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" or module.startswith("torch."):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weight manifest")


def read_manifest(socket_path: str, timeout_s: float = 10.0) -> dict[str, Any]:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(socket_path)
            (length,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
            if length > MAX_PAYLOAD:
                raise ShareError(f"a weight manifest of {length} bytes is too large")
            payload = _recv_exactly(sock, length)
    except OSError as exc:
        raise ShareError(f"no weights from {socket_path}: {exc}") from exc
    try:
        body = _TorchOnly(io.BytesIO(payload)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
        raise ShareError(f"{socket_path} sent no weight manifest: {exc}") from exc
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ShareError(f"{socket_path} sent a manifest of another format")
    return body


def import_weights(
    socket_path: str,
    device: torch.device,
    dtype: torch.dtype,
    mode: ImportMode = "copy",
    timeout_s: float = 10.0,
) -> Imported:
    """The peer's weights on `device`: its memory itself (share) or a copy of it (copy)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if mode not in IMPORT_MODES:
        raise ShareError(f"import mode must be copy or share, not {mode!r}")
    started = time.perf_counter()
    body = read_manifest(socket_path, timeout_s)
    ours = device_uuid(device)
    if body.get("device_uuid") != ours:
        raise ShareError(f"the peer's GPU {body.get('device_uuid')} is not this one ({ours})")
    opened: dict[str, torch.Tensor] = {}
    for name, (rebuild, args) in body["tensors"].items():
        if rebuild is not rebuild_cuda_tensor:
            raise ShareError(f"{name} is not a CUDA tensor handle")
        try:
            tensor: torch.Tensor = rebuild(*args)  # type: ignore[no-untyped-call]
        except RuntimeError as exc:  # the peer freed it, or the driver refused the handle
            raise ShareError(f"cannot open {name}'s handle: {exc}") from exc
        if tensor.dtype != dtype:
            raise ShareError(f"the peer holds {tensor.dtype}, this instance wants {dtype}")
        opened[name] = tensor
    if mode == "share":
        torch.cuda.synchronize(device)  # the producer's events: its writes are visible
        nbytes = sum(_nbytes(t) for t in _distinct(opened).values())
        return Imported(opened, "cuda_ipc", nbytes, time.perf_counter() - started)
    tensors, nbytes = copy_into_one_buffer(opened, device)
    torch.cuda.synchronize(device)
    del opened  # closes the handles: this instance no longer depends on the peer
    return Imported(tensors, "device_copy", nbytes, time.perf_counter() - started)


def copy_into_one_buffer(
    tensors: Mapping[str, torch.Tensor], device: torch.device
) -> tuple[dict[str, torch.Tensor], int]:
    """Device-to-device copies of `tensors` as views of one new buffer (tensors that are the
    same view stay one). Asynchronous: synchronise before relying on them."""
    distinct = _distinct(tensors)
    offsets: dict[tuple[int, tuple[int, ...], torch.dtype], int] = {}
    total = 0
    for key, tensor in distinct.items():
        offsets[key] = total
        total += -(-_nbytes(tensor) // ALIGN) * ALIGN
    flat = torch.empty(total, dtype=torch.uint8, device=device)
    copies: dict[tuple[int, tuple[int, ...], torch.dtype], torch.Tensor] = {}
    for key, tensor in distinct.items():
        start = offsets[key]
        view = flat[start : start + _nbytes(tensor)].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor, non_blocking=True)
        copies[key] = view
    return {name: copies[_key(t)] for name, t in tensors.items()}, total


def _distinct(
    tensors: Mapping[str, torch.Tensor],
) -> dict[tuple[int, tuple[int, ...], torch.dtype], torch.Tensor]:
    out: dict[tuple[int, tuple[int, ...], torch.dtype], torch.Tensor] = {}
    for tensor in tensors.values():
        out.setdefault(_key(tensor), tensor)
    return out


def _key(tensor: torch.Tensor) -> tuple[int, tuple[int, ...], torch.dtype]:
    return tensor.data_ptr(), tuple(tensor.shape), tensor.dtype


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    parts: list[bytes] = []
    while n:
        part = sock.recv(min(n, 1 << 20))
        if not part:
            raise ShareError("the peer closed the connection mid-manifest")
        parts.append(part)
        n -= len(part)
    return b"".join(parts)
