"""Moving a prefill's K/V to the decode instance (PD disaggregation, docs/flowserve.md).

One serialized form for the two transports through the host:

    b"DFKV" | header length (uint32, little-endian) | JSON header | raw tensor bytes

The header is `{"version": 1, "dtype": "bfloat16", "shape": [layers, 2, tokens, heads, dim],
"num_tokens": tokens, "first_token_id": t, "prompt_digest": "<hex>"}`; the bytes are the
`PromptKV.kv` tensor in C order, in the host's byte order (little-endian on every platform
FlowServe runs on).

Transports, each a pair of sides:

- "shm": the prefill instance writes the form to `<shm_dir>/<transfer_id>.kv` (written under a
  temporary name, then renamed, so a reader never sees half a file); the decode instance on the
  same node reads it and deletes it.
- "stream": the prefill instance keeps the K/V in memory and serves the form at
  `GET /kv/{transfer_id}` (a streamed body), forgetting them once fully sent; the decode instance
  fetches them with httpx, under one deadline for the whole body.

A third, "cuda_ipc", moves no bytes through the host: the K/V stay in the prefill instance's
device memory and the decode instance copies them from there (`kv_cuda_ipc`).

`KVStore` is the prefill side of all three: it counts the bytes it holds (refusing a transfer
that would pass `max_bytes`, or `max_device_bytes` of device memory) and drops what is not
fetched within `ttl_s`, so an abandoned transfer never keeps memory or a file. `fetch` and
`discard` are the decode side.

    FlowServeError
     └── KVTransferError      a transfer that cannot be stored, found, read or decoded
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import torch
from starlette.concurrency import run_in_threadpool

from controlplane.wire import KVHandle, KVTransport
from dataplane.flowserve.device_share import DeviceShareError
from dataplane.flowserve.errors import FlowServeError
from dataplane.flowserve.kv_cuda_ipc import SharedImports, fetch_shared
from dataplane.flowserve.prompt_kv import PromptKV

MAGIC = b"DFKV"
VERSION = 1
_LENGTH = struct.Struct("<I")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
CHUNK_BYTES = 1 << 20  # of a streamed body
_MAX_HEADER = 4096


class KVTransferError(FlowServeError):
    """A transfer that cannot be stored, found, read or decoded."""


@dataclass(frozen=True, slots=True)
class KVTransferConfig:
    """Where and how long an instance keeps exported K/V, and how long it waits for imports."""

    shm_dir: Path
    ttl_s: float = 60.0  # an unfetched transfer is dropped after this
    max_bytes: int = 8 << 30  # held at once, all transports together
    fetch_timeout_s: float = 30.0  # a decode instance's whole fetch
    # Device memory held, on each side of cuda_ipc: unfetched exports (past it, an export goes
    # by shm) and imports not yet written into KV blocks (past it, they wait on the host).
    max_device_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if (
            self.ttl_s <= 0
            or self.fetch_timeout_s <= 0
            or self.max_bytes < 1
            or self.max_device_bytes < 0
        ):
            raise ValueError("the KV transfer TTL, timeout and byte caps must be positive")

    @staticmethod
    def default_shm_dir() -> Path:
        """/dev/shm/deepflow-kv where the node has /dev/shm, else under the temp dir."""
        shm = Path("/dev/shm")
        return (shm if shm.is_dir() else Path(tempfile.gettempdir())) / "deepflow-kv"


# --- the serialized form ---------------------------------------------------------------------


def encode_header(kv: PromptKV) -> bytes:
    header = {
        "version": VERSION,
        "dtype": _DTYPE_NAMES[kv.kv.dtype],
        "shape": list(kv.kv.shape),
        "num_tokens": kv.num_tokens,
        "first_token_id": kv.first_token_id,
        "prompt_digest": kv.prompt_digest,
    }
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + _LENGTH.pack(len(encoded)) + encoded


def payload(kv: PromptKV) -> memoryview:
    """The tensor's bytes, without a copy when it is contiguous."""
    flat = kv.kv.contiguous().reshape(-1).view(torch.uint8)
    return flat.numpy().data


def serialized_size(kv: PromptKV) -> int:
    return len(encode_header(kv)) + kv.num_bytes


def decode(data: bytearray) -> PromptKV:
    """The PromptKV serialized in `data` (sharing its memory). Raises KVTransferError."""
    prefix = len(MAGIC) + _LENGTH.size
    if len(data) < prefix or bytes(data[: len(MAGIC)]) != MAGIC:
        raise KVTransferError("not a serialized K/V transfer")
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    if length > _MAX_HEADER or prefix + length > len(data):
        raise KVTransferError("the K/V transfer's header is cut short or too long")
    try:
        header = json.loads(bytes(data[prefix : prefix + length]))
        dtype = _DTYPES[header["dtype"]]
        shape = [int(n) for n in header["shape"]]
        first_token_id = int(header["first_token_id"])
        digest = header.get("prompt_digest")
        if digest is not None and not isinstance(digest, str):
            raise TypeError("prompt_digest is not a string")
        version, num_tokens = header["version"], int(header["num_tokens"])
    except (ValueError, KeyError, TypeError) as exc:
        raise KVTransferError(f"the K/V transfer's header is unreadable: {exc}") from exc
    if version != VERSION or len(shape) != 5 or shape[2] != num_tokens:
        raise KVTransferError(f"unsupported K/V transfer header {header}")
    numel = 1
    for n in shape:
        numel *= n
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) - prefix - length != numel * itemsize:
        raise KVTransferError(
            f"the K/V transfer holds {len(data) - prefix - length} bytes of tensor data, "
            f"not the {numel * itemsize} its header says"
        )
    if numel == 0:
        raise KVTransferError("the K/V transfer is empty")
    tensor = torch.frombuffer(data, dtype=dtype, count=numel, offset=prefix + length)
    try:
        return PromptKV(tensor.view(shape), first_token_id, digest)
    except ValueError as exc:
        raise KVTransferError(str(exc)) from exc


# --- the prefill side ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredTransfer:
    transfer_id: str
    transport: KVTransport
    num_bytes: int  # of the serialized form; cuda_ipc: of the tensor
    path: Path | None  # shm: the file the decode instance reads


@dataclass(slots=True)
class _Held:
    stored: StoredTransfer
    expires_at: float
    kv: PromptKV | None  # stream: what GET /kv/{id} serves; cuda_ipc: the device buffer
    shared: bool = False  # cuda_ipc: a handle of it was given out (once at most)


class KVStore:
    """The transfers an instance exported and nobody has fetched yet. Thread-safe."""

    def __init__(
        self, config: KVTransferConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._sweep_stale_files()

    @property
    def num_bytes(self) -> int:
        with self._lock:
            return sum(h.stored.num_bytes for h in self._held.values())

    @property
    def num_transfers(self) -> int:
        with self._lock:
            return len(self._held)

    @property
    def device_bytes(self) -> int:
        """Of cuda_ipc transfers, held in device memory."""
        with self._lock:
            return self._device_bytes()

    def put(self, transfer_id: str, transport: KVTransport, kv: PromptKV) -> StoredTransfer:
        """Hold `kv` for a decode instance: cuda_ipc K/V on the device, the others on the host.
        Raises KVTransferError when it would pass a byte cap, or when its file cannot be
        written."""
        header = encode_header(kv)
        on_device = transport == "cuda_ipc"
        num_bytes = kv.num_bytes if on_device else len(header) + kv.num_bytes
        with self._lock:
            held = sum(h.stored.num_bytes for h in self._held.values())
            if held + num_bytes > self.config.max_bytes:
                raise KVTransferError(
                    f"this instance already holds {held} bytes of unfetched K/V; "
                    f"{num_bytes} more would pass its cap of {self.config.max_bytes}"
                )
            on_gpu = self._device_bytes()
            if on_device and on_gpu + num_bytes > self.config.max_device_bytes:
                raise KVTransferError(
                    f"this instance already holds {on_gpu} bytes of unfetched K/V in device "
                    f"memory; {num_bytes} more would pass its cap of "
                    f"{self.config.max_device_bytes}"
                )
            path = self._path(transfer_id) if transport == "shm" else None
            stored = StoredTransfer(transfer_id, transport, num_bytes, path)
            self._held[transfer_id] = _Held(
                stored, self._clock() + self.config.ttl_s, kv if path is None else None
            )
        if path is not None:
            try:
                self._write(path, header, kv)
            except OSError as exc:
                self.discard(transfer_id)
                raise KVTransferError(f"cannot write the K/V to {path}: {exc}") from exc
        return stored

    def stream(self, transfer_id: str) -> Iterator[bytes | memoryview] | None:
        """The serialized form of a stream transfer, in chunks; the transfer is forgotten once
        the last chunk has been taken. None when it is unknown (fetched, expired, discarded)."""
        with self._lock:
            held = self._held.get(transfer_id)
            kv = held.kv if held is not None and held.stored.transport == "stream" else None
        if held is None or kv is None:
            return None
        return self._chunks(held, kv)

    def claim(self, transfer_id: str) -> PromptKV | None:
        """The device K/V of a cuda_ipc transfer, to share with a decode instance: once. None
        when it is unknown, of another transport, or already claimed. It stays held (and
        counted) until discarded or expired."""
        with self._lock:
            held = self._held.get(transfer_id)
            if held is None or held.stored.transport != "cuda_ipc" or held.shared:
                return None
            held.shared = True
            return held.kv

    def _chunks(self, held: _Held, kv: PromptKV) -> Iterator[bytes | memoryview]:
        yield encode_header(kv)
        data = payload(kv)
        for start in range(0, len(data), CHUNK_BYTES):
            yield data[start : start + CHUNK_BYTES]
        with self._lock:
            if self._held.get(held.stored.transfer_id) is held:
                del self._held[held.stored.transfer_id]

    def discard(self, transfer_id: str) -> bool:
        """Forget a transfer and delete its file; False when it was not held."""
        with self._lock:
            held = self._held.pop(transfer_id, None)
        if held is None:
            return False
        if held.stored.path is not None:
            held.stored.path.unlink(missing_ok=True)
        shared = held.stored.transport == "cuda_ipc"
        del held  # the last reference to its K/V
        if shared:
            collect_shared_buffers()
        return True

    def expire(self) -> list[StoredTransfer]:
        """Drop the transfers past their TTL (deleting their files) and forget shm transfers
        whose file the decode instance has taken. Returns the expired ones."""
        now = self._clock()
        expired, fetched = [], []
        with self._lock:
            for transfer_id, held in self._held.items():
                if held.expires_at <= now:
                    expired.append(held.stored)
                elif held.stored.path is not None and not held.stored.path.exists():
                    fetched.append(transfer_id)
            for transfer_id in fetched:
                del self._held[transfer_id]
        for stored in expired:
            self.discard(stored.transfer_id)
        return expired

    def close(self) -> None:
        """Drop everything held (the instance is stopping)."""
        with self._lock:
            transfer_ids = list(self._held)
        for transfer_id in transfer_ids:
            self.discard(transfer_id)

    def _path(self, transfer_id: str) -> Path:
        return shm_path(self.config.shm_dir, transfer_id)

    def _device_bytes(self) -> int:  # under the lock
        return sum(
            h.stored.num_bytes for h in self._held.values() if h.stored.transport == "cuda_ipc"
        )

    @staticmethod
    def _write(path: Path, header: bytes, kv: PromptKV) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(payload(kv))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _sweep_stale_files(self) -> None:
        """Delete transfer files older than the TTL: left by an instance that died."""
        directory = self.config.shm_dir
        if not directory.is_dir():
            return
        cutoff = time.time() - self.config.ttl_s
        for path in [*directory.glob("*.kv"), *directory.glob(".*.tmp")]:
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
            except OSError:
                continue


def hold_export(
    store: KVStore, transfer_id: str, transport: KVTransport, kv: PromptKV, *, on_device: bool
) -> StoredTransfer:
    """Hold a prefill's exported K/V: on the host by `transport` (a same-node hand-off by shm),
    or, when the engine left them on the device (a same-node hand-off on a platform that shares
    device memory), by cuda_ipc; past the device cap those are copied to the host and go by shm.
    Raises KVTransferError."""
    if not on_device:
        return store.put(transfer_id, "shm" if transport == "cuda_ipc" else transport, kv)
    try:
        return store.put(transfer_id, "cuda_ipc", kv)
    except KVTransferError:
        # A blocking copy, whatever device and stream this thread is on: the K/V are complete.
        on_host = PromptKV(kv.kv.cpu(), kv.first_token_id, kv.prompt_digest, kv.export_s)
        return store.put(transfer_id, "shm", on_host)


def shm_path(shm_dir: Path, transfer_id: str) -> Path:
    """The file of an shm transfer. Raises KVTransferError for an id that is not a plain name."""
    if not transfer_id.replace("-", "").replace("_", "").isalnum():
        raise KVTransferError(f"transfer id {transfer_id!r} is not a plain name")
    return shm_dir / f"{transfer_id}.kv"


# --- the decode side -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FetchedKV:
    kv: PromptKV
    num_bytes: int
    fetch_s: float  # from asking to holding the bytes, decoded


async def fetch(
    handle: KVHandle,
    config: KVTransferConfig,
    client: httpx.AsyncClient,
    imports: SharedImports | None = None,
) -> FetchedKV:
    """Take the K/V `handle` points at: read and delete the shm file, GET the stream, or copy
    them from the prefill instance's device memory (cuda_ipc, through `imports`: None where
    this instance's platform cannot). Raises KVTransferError for a transfer that is missing,
    expired, late, unreadable, or that this instance cannot open."""
    started = time.perf_counter()
    try:
        with anyio.fail_after(config.fetch_timeout_s):
            kv, num_bytes = await _take(handle, config, client, imports)
    except TimeoutError as exc:
        raise KVTransferError(
            f"the K/V transfer {handle.transfer_id} took over {config.fetch_timeout_s} s"
        ) from exc
    if (kv.num_tokens, kv.first_token_id) != (handle.num_tokens, handle.first_token_id):
        raise KVTransferError(
            f"transfer {handle.transfer_id} holds {kv.num_tokens} tokens and first token "
            f"{kv.first_token_id}; its handle says {handle.num_tokens} and {handle.first_token_id}"
        )
    return FetchedKV(kv, num_bytes, time.perf_counter() - started)


async def _take(
    handle: KVHandle,
    config: KVTransferConfig,
    client: httpx.AsyncClient,
    imports: SharedImports | None,
) -> tuple[PromptKV, int]:
    """The K/V and the bytes moved."""
    limit = min(handle.num_bytes, config.max_bytes)
    if handle.transport == "shm":
        data = await run_in_threadpool(_read_shm, handle, config.shm_dir, limit)
        return decode(data), len(data)
    if handle.transport == "stream":
        data = await _read_stream(handle, client, limit)
        return decode(data), len(data)
    _check_stream_url(handle)
    try:
        kv = await fetch_shared(handle, client, imports)
    except DeviceShareError as exc:
        raise KVTransferError(f"K/V transfer {handle.transfer_id} by cuda_ipc: {exc}") from exc
    return kv, kv.num_bytes


async def discard(handle: KVHandle, config: KVTransferConfig, client: httpx.AsyncClient) -> None:
    """Drop a transfer this instance will not import (best effort: it expires anyway)."""
    try:
        if handle.transport == "shm":
            _checked_shm_path(handle, config.shm_dir).unlink(missing_ok=True)
        else:
            _check_stream_url(handle)
            await client.delete(handle.location, timeout=min(5.0, config.fetch_timeout_s))
    except (KVTransferError, OSError, httpx.HTTPError):
        pass


def _checked_shm_path(handle: KVHandle, shm_dir: Path) -> Path:
    """The handle's file, which must be a transfer file in this node's K/V directory: a decode
    instance deletes what it reads, so it reads nothing else."""
    expected = shm_path(shm_dir, handle.transfer_id)
    if Path(handle.location) != expected:
        raise KVTransferError(f"{handle.location} is not a K/V transfer file in {shm_dir}")
    return expected


def _read_shm(handle: KVHandle, shm_dir: Path, limit: int) -> bytearray:
    path = _checked_shm_path(handle, shm_dir)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise KVTransferError(f"{path} holds {size} bytes, over the {limit} expected")
            data = bytearray(size)
            if f.readinto(data) != size:
                raise KVTransferError(f"{path} was cut short while read")
    except FileNotFoundError as exc:
        raise KVTransferError(
            f"K/V transfer {handle.transfer_id} is not in {shm_dir} (expired or taken)"
        ) from exc
    except OSError as exc:
        raise KVTransferError(f"cannot read {path}: {exc}") from exc
    finally:
        path.unlink(missing_ok=True)
    return data


def _check_stream_url(handle: KVHandle) -> None:
    if not handle.location.startswith(("http://", "https://")) or not handle.location.endswith(
        f"/kv/{handle.transfer_id}"
    ):
        raise KVTransferError(f"{handle.location} is not a K/V transfer URL")


async def _read_stream(handle: KVHandle, client: httpx.AsyncClient, limit: int) -> bytearray:
    _check_stream_url(handle)
    data = bytearray()
    try:
        async with client.stream("GET", handle.location) as response:
            if response.status_code != 200:
                raise KVTransferError(
                    f"{handle.location} answered {response.status_code} (expired or taken)"
                )
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > limit:
                    raise KVTransferError(f"{handle.location} sent over the {limit} bytes expected")
    except httpx.HTTPError as exc:
        raise KVTransferError(f"cannot fetch {handle.location}: {exc}") from exc
    return data


def collect_shared_buffers() -> None:
    """Free dropped cuda_ipc K/V now: PyTorch keeps a buffer it has shared with another
    process alive until that process has closed its handle and the producer collects
    (`torch.cuda.ipc_collect`), which it otherwise does only now and then."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.ipc_collect()  # type: ignore[no-untyped-call]
