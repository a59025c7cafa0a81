"""A DRAM cache entry (`weights_cache`) onto a GPU at PCIe speed, in one pass.

An entry maps as one flat read-only region whose tensors sit at 4 KiB-aligned offsets. The
upload allocates one device buffer of the same layout, moves the region across and hands back
views of the buffer at the same offsets, which the model takes as its parameters (no per-tensor
copy, no conversion). The bytes cross by one of:

    registered  the mapping was registered ahead (`registered_cache`, a warm pod's): the whole
                region goes in one DMA, with no registration on the path
    register    cudaHostRegister the mapping (read-only) for this process, so the whole region
                goes in one DMA; unregistered afterwards
    staged      copy the region through a ring of pinned buffers in large chunks: the CPU fills
                one while the copy engine drains another
    pageable    one plain copy from the mapping; the driver stages it itself (the baseline)

`registered` is the default for a region registered ahead, `staged` for any other: on an H100
(PCIe 5 x16, 51-55 GB/s from pinned memory) `staged` moved a 2.3 GiB entry at 31-36 GB/s
(median) once its pinned ring was made ahead (18-22 GB/s when each upload pinned its own),
`register` at 15-19 GB/s, of which 55-70% was the registration itself (pinning 600 K pages:
0.07-0.1 s, no faster when split over threads), the DMA after it at ~43 GB/s, which is what
`registered` is left with; pageable 7-10 GB/s (docs/benchmarks/scaling-gpu.md).
`$DEEPFLOW_UPLOAD_METHOD` overrides the default (`registered` then fails on a region that is
not registered).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch

from dataplane.flowserve import registered_cache

UploadMethod = Literal["registered", "staged", "register", "pageable"]
METHODS: tuple[UploadMethod, ...] = ("registered", "staged", "register", "pageable")
METHOD_ENV = "DEEPFLOW_UPLOAD_METHOD"
CHUNK_BYTES = 64 << 20
NUM_STAGING_BUFFERS = 3
# Threads that fill a staging buffer from the mapping, each a slice. One: on an H100 host
# (16 cores) eight threads filled slower than one (31 vs 36 GB/s for the whole upload), the
# host's memory traffic (read the mapping, write the ring, the DMA reading it) being the bound.
FILL_THREADS = 1


class UploadError(Exception):
    """The tensors are not one flat host region, the driver refused to register it, or
    `registered` was asked of a region that is not."""


@dataclass(slots=True)
class FlatRegion:
    """Tensors that are views of one contiguous host storage: the region and where each lies."""

    host: torch.Tensor  # [nbytes] uint8 over the whole storage
    views: dict[str, tuple[int, torch.dtype, list[int]]]  # name -> (byte offset, dtype, shape)


@dataclass(slots=True)
class Upload:
    tensors: dict[str, torch.Tensor]  # views of one device buffer
    nbytes: int
    method: UploadMethod
    seconds: float  # allocation, transfer and (for `register`) the registration, synchronised
    register_seconds: float = 0.0

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def flat_region(tensors: Mapping[str, torch.Tensor]) -> FlatRegion:
    """The one host storage every tensor views (a mapped entry's). Raises UploadError
    otherwise."""
    if not tensors:
        raise UploadError("no tensors to upload")
    storage = next(iter(tensors.values())).untyped_storage()
    base = storage.data_ptr()
    views: dict[str, tuple[int, torch.dtype, list[int]]] = {}
    for name, tensor in tensors.items():
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise UploadError(f"{name} is not a contiguous host tensor")
        if tensor.untyped_storage().data_ptr() != base:
            raise UploadError(f"{name} is not in the same storage as the others")
        views[name] = (tensor.data_ptr() - base, tensor.dtype, list(tensor.shape))
    host = torch.empty(0, dtype=torch.uint8).set_(storage)
    return FlatRegion(host, views)


def upload(
    tensors: Mapping[str, torch.Tensor],
    device: torch.device,
    method: UploadMethod | None = None,
    ring: StagingRing | None = None,
) -> Upload:
    """The tensors on `device` as views of one buffer. Raises UploadError when they are not one
    flat host region, when the driver refused to register it (`register`), or when it is not
    registered (`registered`). `method` None: `choose_method`. `ring`: the staging ring
    (default: the process's, `prepare()`)."""
    region = flat_region(tensors)
    ptr, nbytes = region.host.data_ptr(), region.host.numel()
    method = method or choose_method(
        os.environ.get(METHOD_ENV) or None, registered_cache.REGISTRY.covers(ptr, nbytes)
    )
    if method == "staged" and ring is None:
        ring = prepare()
    started = time.perf_counter()
    flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
    register_s = 0.0
    if method == "registered":
        with registered_cache.REGISTRY.held(ptr, nbytes) as registered:
            if not registered:
                raise UploadError("the region was not registered ahead (registered_cache)")
            flat.copy_(region.host, non_blocking=True)  # one DMA from the registered pages
            torch.cuda.synchronize(device)
    elif method == "register":
        register_s = _copy_registered(region.host, flat)
    elif method == "staged":
        assert ring is not None
        _copy_staged(region.host, flat, ring)
    else:
        flat.copy_(region.host)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    out = {
        name: flat[offset : offset + _nbytes(dtype, shape)].view(dtype).view(shape)
        for name, (offset, dtype, shape) in region.views.items()
    }
    return Upload(out, flat.numel(), method, seconds, register_s)


def _copy_registered(host: torch.Tensor, flat: torch.Tensor) -> float:
    """One DMA from the mapping registered for it; returns the seconds registration took."""
    cuda_host = registered_cache.CudaHost()
    ptr, nbytes = host.data_ptr(), host.numel()
    started = time.perf_counter()
    code = cuda_host.register(ptr, nbytes)
    if code != 0:
        raise UploadError(f"cudaHostRegister refused the mapping (cudaError {code})")
    register_s = time.perf_counter() - started
    try:
        flat.copy_(host)  # one DMA straight from the registered pages
        torch.cuda.synchronize(flat.device)
    finally:
        cuda_host.unregister(ptr)
    return register_s


class StagingRing:
    """Pinned staging buffers and the threads that fill them, made once per process: pinning
    192 MiB costs tens of milliseconds, which a warm pod pays before it is handed a model
    (`prepare`), not on the upload's path."""

    def __init__(
        self,
        chunk_bytes: int,
        num_buffers: int,
        fill_threads: int,
        *,
        min_split_bytes: int = 4 << 20,  # smaller copies are not worth a thread hand-off
    ) -> None:
        if chunk_bytes < 1 or num_buffers < 1 or fill_threads < 1:
            raise ValueError("a staging ring needs a chunk, a buffer and a thread at least")
        self.chunk_bytes = chunk_bytes
        self.min_split_bytes = min_split_bytes
        self.buffers = [
            torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(num_buffers)
        ]
        self.fill_threads = fill_threads
        self._pool = ThreadPoolExecutor(fill_threads, thread_name_prefix="flowserve-upload")

    def fill(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst[:] = src, in slices copied by the ring's threads (copy_ releases the GIL)."""
        n = src.numel()
        step = -(-n // self.fill_threads)
        if self.fill_threads == 1 or n < max(self.min_split_bytes, self.fill_threads):
            dst.copy_(src)
            return
        slices = [(a, min(a + step, n)) for a in range(0, n, step)]
        list(self._pool.map(lambda r: dst[r[0] : r[1]].copy_(src[r[0] : r[1]]), slices))


_RING: StagingRing | None = None
_RING_LOCK = threading.Lock()


def prepare(chunk_bytes: int = CHUNK_BYTES, fill_threads: int = FILL_THREADS) -> StagingRing:
    """The process's staging ring, made on first use (a warm pod calls this at start)."""
    global _RING
    with _RING_LOCK:
        ring = _RING
        if ring is None or ring.chunk_bytes != chunk_bytes or ring.fill_threads != fill_threads:
            ring = _RING = StagingRing(chunk_bytes, NUM_STAGING_BUFFERS, fill_threads)
        return ring


def _copy_staged(host: torch.Tensor, flat: torch.Tensor, ring: StagingRing) -> None:
    """Chunks through the ring of pinned buffers on a side stream: the CPU fills buffer i+1
    while the copy engine drains buffer i."""
    nbytes = host.numel()
    chunk = ring.chunk_bytes
    done: list[torch.cuda.Event | None] = [None] * len(ring.buffers)
    stream = torch.cuda.Stream(flat.device)  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream(flat.device))  # `flat` was allocated there
    for i, start in enumerate(range(0, nbytes, chunk)):
        n = min(chunk, nbytes - start)
        slot = i % len(ring.buffers)
        event = done[slot]
        if event is not None:
            event.synchronize()  # its last chunk has left the buffer
        staging = ring.buffers[slot][:n]
        ring.fill(staging, host[start : start + n])
        with torch.cuda.stream(stream):
            flat[start : start + n].copy_(staging, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        done[slot] = event
    stream.synchronize()


def choose_method(requested: str | None, registered: bool) -> UploadMethod:
    """`requested` ($DEEPFLOW_UPLOAD_METHOD) when given; else `registered` for a region that
    was registered ahead, `staged` for any other."""
    if requested is None:
        return "registered" if registered else "staged"
    for method in METHODS:
        if requested == method:
            return method
    raise UploadError(f"${METHOD_ENV} must be one of {', '.join(METHODS)}, not {requested!r}")


def _nbytes(dtype: torch.dtype, shape: list[int]) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n
