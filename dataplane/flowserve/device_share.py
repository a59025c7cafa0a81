"""Sharing a tensor in device memory with another process of the node, behind the platform
(`Platform.device_share()`): CUDA IPC, for the PD hand-off between two instances on one node
(transport "cuda_ipc", docs/flowserve.md).

    exporter:  shared = share.share(tensor, peer)           # JSON-safe, for one importer, once
    importer:  tensor = share.take(shared, num_bytes=n, to_host=False)   # a copy it owns

The handle is torch's own CUDA tensor reduction (`torch.multiprocessing.reductions`, which
`dataplane.scaleout.cuda_share` uses for weights): an IPC handle of the caching allocator's
segment and the tensor's place in it, a counter in shared memory that keeps the exporter from
reusing the memory while an importer has it open, and an IPC event the importer's stream waits
on. It travels as JSON (the handles in base64) and is rebuilt from an allow-list, never
unpickled. Both processes must run the same torch, whose reduction it is (`SharePeer.runtime`).

Every handle made must be opened, or released, exactly once: memory whose counter never drops
stays allocated in the exporter until its process exits. So an exporter makes a handle only for
an importer that has said what it can open (`SharePeer`: its torch and the GPUs it can map),
and an importer that cannot open one releases its counter.

The importer opens a handle on its own GPU: the same GPU is a plain mapping, another GPU of the
node a peer mapping (CUDA enables peer access lazily), so its copy is device to device either
way, never through the host. It copies on a stream of its own, waits for the copy and closes the
mapping before `take` returns: the exporter may free its buffer as soon as it hears back.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dataplane.flowserve.errors import FlowServeError

RUNTIME = f"torch {torch.__version__}"
FORMAT = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_STORAGES: dict[str, Any] = {
    "TypedStorage": torch.storage.TypedStorage,
    "UntypedStorage": torch.UntypedStorage,
}
_COUNTER_NAME = re.compile(rb"/[A-Za-z0-9_.-]{1,200}")  # a POSIX shared memory name
_NUM_ARGS = 15  # of torch's rebuild_cuda_tensor


class DeviceShareError(FlowServeError):
    """A tensor that cannot be shared with this peer, or a shared tensor that cannot be taken."""


@dataclass(frozen=True, slots=True)
class SharePeer:
    """What an importing process can open: handles made by this torch (`runtime`), of memory on
    these GPUs (`devices`: UUIDs, its own first)."""

    runtime: str
    devices: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "devices": list(self.devices)}

    @classmethod
    def from_json(cls, data: Any) -> SharePeer:
        """Raises DeviceShareError for anything but `to_json`'s shape."""
        runtime = data.get("runtime") if isinstance(data, dict) else None
        devices = data.get("devices") if isinstance(data, dict) else None
        if (
            not isinstance(runtime, str)
            or not isinstance(devices, list)
            or not all(isinstance(d, str) for d in devices)
        ):
            raise DeviceShareError('a share peer is {"runtime": str, "devices": [str, ...]}')
        return cls(runtime, tuple(devices))


class DeviceShare(Protocol):
    """How a platform shares device memory with other processes of its node."""

    def peer(self) -> SharePeer:
        """What this process can open."""
        ...

    def share(self, tensor: torch.Tensor, peer: SharePeer) -> dict[str, Any]:
        """A handle of `tensor`, which must be complete (no work on it left to wait for), for
        `peer` to take once. Raises DeviceShareError when `peer` cannot open it."""
        ...

    def take(self, shared: Mapping[str, Any], *, num_bytes: int, to_host: bool) -> torch.Tensor:
        """A copy, owned by this process, of the tensor of `num_bytes` bytes that `shared`
        names: on this process's device, or in pinned host memory with `to_host`; complete when
        returned. Raises DeviceShareError (with the handle released) when it cannot be had."""
        ...


class CudaIpc:
    """CUDA IPC through torch's tensor reduction (see the module's docstring)."""

    def __init__(self, device: torch.device) -> None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        self._peer: SharePeer | None = None

    def peer(self) -> SharePeer:
        if self._peer is None:
            from dataplane.scaleout.cuda_share import device_uuid

            index = self.device.index
            assert index is not None
            others = [
                device_uuid(torch.device("cuda", i))
                for i in range(torch.cuda.device_count())
                if i != index and torch.cuda.can_device_access_peer(index, i)
            ]
            self._peer = SharePeer(RUNTIME, (device_uuid(self.device), *others))
        return self._peer

    def share(self, tensor: torch.Tensor, peer: SharePeer) -> dict[str, Any]:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

        from dataplane.scaleout.cuda_share import device_uuid

        if peer.runtime != RUNTIME:
            raise DeviceShareError(
                f"the importer runs {peer.runtime} and this instance {RUNTIME}: their CUDA IPC "
                "handles differ"
            )
        gpu = device_uuid(tensor.device)
        if gpu not in peer.devices:
            raise DeviceShareError(
                f"the tensor is on GPU {gpu}, which the importer cannot map (it is on another "
                "node, or does not see that GPU)"
            )
        if tensor.dtype not in _DTYPE_NAMES:
            raise DeviceShareError(f"cannot share a tensor of {tensor.dtype}")
        # The handle's event is recorded on the current stream: an idle one, so that the
        # importer waits for nothing (the tensor is complete, as `share` requires).
        side = torch.cuda.Stream(tensor.device)  # type: ignore[no-untyped-call]
        try:
            with torch.cuda.device(tensor.device), torch.cuda.stream(side):
                rebuild, args = reduce_tensor(tensor.detach())  # type: ignore[no-untyped-call]
        except RuntimeError as exc:  # e.g. memory this process itself took from another
            raise DeviceShareError(f"cannot make a CUDA IPC handle: {exc}") from exc
        if rebuild is not rebuild_cuda_tensor or len(args) != _NUM_ARGS:
            raise DeviceShareError(f"{RUNTIME} reduces CUDA tensors in a way unknown here")
        return encode_handle(args)

    def take(self, shared: Mapping[str, Any], *, num_bytes: int, to_host: bool) -> torch.Tensor:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        index = self.device.index
        assert index is not None
        args = decode_handle(shared, index)
        shape, dtype = args[1], args[5]
        size = shape.numel() * dtype.itemsize
        if size != num_bytes or args[3] * dtype.itemsize + size > args[8]:
            _release_counter(args)
            raise DeviceShareError(
                f"the shared tensor is {list(shape)} {dtype} in a storage of {args[8]} bytes; "
                f"{num_bytes} bytes were expected"
            )
        stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            try:
                # Maps the exporter's segment into this GPU's address space and makes this stream
                # wait on the exporter's event.
                opened: torch.Tensor = rebuild_cuda_tensor(*args)  # type: ignore[no-untyped-call]
            except (RuntimeError, TypeError, ValueError) as exc:  # freed, a GPU it cannot map
                _release_counter(args)
                raise DeviceShareError(f"cannot open the CUDA IPC handle: {exc}") from exc
            try:
                if to_host:
                    copy = torch.empty(shape, dtype=dtype, pin_memory=True)
                else:
                    copy = torch.empty(shape, dtype=dtype, device=self.device)
                copy.copy_(opened, non_blocking=True)
                stream.synchronize()
            except RuntimeError as exc:
                raise DeviceShareError(f"cannot copy the shared tensor: {exc}") from exc
            finally:
                # The last reference: torch syncs this stream, drops the exporter's counter and
                # closes the mapping once nothing else of that segment is open here.
                del opened
        return copy


def encode_handle(args: tuple[Any, ...]) -> dict[str, Any]:
    """torch's `rebuild_cuda_tensor` arguments as JSON-safe data (the exporter's device index,
    which means nothing in another process, and requires_grad are left out)."""
    (
        _tensor_cls,
        shape,
        stride,
        offset,
        storage_cls,
        dtype,
        _device,
        handle,
        storage_bytes,
        storage_offset,
        _requires_grad,
        counter,
        counter_offset,
        event,
        event_sync,
    ) = args
    if storage_cls.__name__ not in _STORAGES or dtype not in _DTYPE_NAMES:
        raise DeviceShareError(f"cannot share a {dtype} tensor of {storage_cls.__name__}")
    return {
        "format": FORMAT,
        "runtime": RUNTIME,
        "shape": [int(n) for n in shape],
        "stride": [int(n) for n in stride],
        "offset": int(offset),
        "storage": storage_cls.__name__,
        "dtype": _DTYPE_NAMES[dtype],
        "handle": _b64(handle),
        "storage_bytes": int(storage_bytes),
        "storage_offset": int(storage_offset),
        "counter": _b64(counter),
        "counter_offset": int(counter_offset),
        "event": _b64(event),
        "event_sync": bool(event_sync),
    }


def decode_handle(shared: Mapping[str, Any], device_index: int) -> tuple[Any, ...]:
    """The `rebuild_cuda_tensor` arguments of a handle `encode_handle` made, to open it on this
    process's GPU `device_index`. Raises DeviceShareError for anything else."""
    try:
        if shared["format"] != FORMAT or shared["runtime"] != RUNTIME:
            raise DeviceShareError(
                f"the handle is format {shared['format']} of {shared['runtime']}; this instance "
                f"reads format {FORMAT} of {RUNTIME}"
            )
        shape = _ints(shared["shape"])
        stride = _ints(shared["stride"])
        counter = _unb64(shared["counter"])
        if len(shape) != len(stride) or counter is None or not _COUNTER_NAME.fullmatch(counter):
            raise ValueError("bad shape, stride or counter")
        handle, event = _unb64(shared["handle"]), _unb64(shared["event"])
        if not handle or event is None:
            raise ValueError("no memory or event handle")
        event_sync = shared["event_sync"]
        if not isinstance(event_sync, bool):
            raise TypeError("event_sync is not a boolean")
        return (
            torch.Tensor,
            torch.Size(shape),
            tuple(stride),
            _int(shared["offset"]),
            _STORAGES[shared["storage"]],
            _DTYPES[shared["dtype"]],
            device_index,
            handle,
            _int(shared["storage_bytes"]),
            _int(shared["storage_offset"]),
            False,
            counter,
            _int(shared["counter_offset"]),
            event,
            event_sync,
        )
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise DeviceShareError(f"not a CUDA IPC handle: {exc!r}") from exc


def _release_counter(args: tuple[Any, ...]) -> None:
    """Drop the exporter's counter of a handle this process will not open (best effort: the
    exporter's process may be gone)."""
    try:
        torch.UntypedStorage._release_ipc_counter_cuda(args[11], args[12])
    except RuntimeError:
        pass


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise TypeError("a handle is base64 text")
    return base64.b64decode(text, validate=True)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a non-negative integer")
    return value


def _ints(values: Any) -> list[int]:
    if not isinstance(values, list):
        raise TypeError("not a list")
    return [_int(v) for v in values]
