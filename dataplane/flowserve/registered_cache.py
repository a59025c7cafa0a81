"""DRAM cache entries mapped and registered with CUDA ahead of need, kept for the process.

A warm pod (`dataplane.scaleout.pod`) knows the node's DRAM cache before it knows its model.
While it waits it maps each entry (`weights_cache.map_entry`) and cudaHostRegisters the mapping
(`register_entries`). Handed a model whose entry is among them, `weights_cache.open_cached` gives
back that very mapping (`lookup`) and `device_upload.upload` moves it in one DMA from the
registered pages, with no registration on the path: on an H100 registering a 2.3 GiB entry
costs ~0.07 s, about as long as the DMA after it (~43 GB/s).

The trade-off: a mapping holds the entry's shared flock, and the node's cache evicts only an
entry it can lock exclusively. So every entry a pod registers is pinned for as long as that pod
waits; a preload that needs their room fails with CacheFull until the pods are handed out or
stopped. Once handed its work the pod lets the others go: the engine's `ready_weights` keeps
only its own entry (`keep_only`), which its instance would pin anyway, and a training task
keeps none. Unregistering costs time too, on the instance's start, after its upload. The pages
are the cache's shared memory: registering them takes no memory of its own, only locks it.

`$DEEPFLOW_REGISTER_AHEAD_BYTES` bounds the bytes a pod registers ahead (`budget_from_env`):
unset, no bound (every entry: a node's cache holds the models it expects to serve); 0, none.
Within the bound the most recently used entries go first. An entry preloaded after the pod
registered is not registered: it is uploaded through the staging ring (`device_upload`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dataplane.flowserve import weights_cache as wc

log = logging.getLogger(__name__)

BUDGET_ENV = "DEEPFLOW_REGISTER_AHEAD_BYTES"
# cudaHostRegisterPortable | cudaHostRegisterReadOnly: the mapping is PROT_READ.
REGISTER_FLAGS = 0x01 | 0x08


class HostMemory(Protocol):
    """Page-locks host memory for the device: CUDA's, or a test's stand-in."""

    def register(self, ptr: int, nbytes: int) -> int:
        """0, or the driver's error code."""
        ...

    def unregister(self, ptr: int) -> None: ...


class CudaHost:
    def register(self, ptr: int, nbytes: int) -> int:
        import torch

        cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        return int(cudart.cudaHostRegister(ptr, nbytes, REGISTER_FLAGS))

    def unregister(self, ptr: int) -> None:
        import torch

        torch.cuda.cudart().cudaHostUnregister(ptr)  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class Candidate:
    """An entry of the cache, as the budget sees it."""

    entry: Path
    nbytes: int
    last_used: float  # the cache's LRU clock: the entry directory's mtime


@dataclass(slots=True)
class Registration:
    entry: Path  # resolved
    file_id: tuple[int, int]  # (st_dev, st_ino) of its weights.bin, taken before mapping it
    mapped: wc.MappedWeights
    ptr: int
    nbytes: int


def choose(candidates: Sequence[Candidate], max_bytes: int | None) -> list[Candidate]:
    """What to register: the most recently used first, each that still fits in `max_bytes`
    (None: every one)."""
    chosen: list[Candidate] = []
    left = max_bytes
    for candidate in sorted(candidates, key=lambda c: c.last_used, reverse=True):
        if left is not None and candidate.nbytes > left:
            continue
        chosen.append(candidate)
        if left is not None:
            left -= candidate.nbytes
    return chosen


def covers(regions: Iterable[tuple[int, int]], ptr: int, nbytes: int) -> bool:
    """Whether [ptr, ptr + nbytes) lies inside one of the (start, nbytes) regions."""
    return any(start <= ptr and ptr + nbytes <= start + size for start, size in regions)


def budget_from_env() -> int | None:
    """$DEEPFLOW_REGISTER_AHEAD_BYTES: None when unset (no bound). Raises ValueError when it is
    not a whole number of bytes, at least 0."""
    value = os.environ.get(BUDGET_ENV, "").strip()
    if not value:
        return None
    try:
        budget = int(value)
    except ValueError:
        budget = -1
    if budget < 0:
        raise ValueError(f"${BUDGET_ENV} must be a number of bytes (0 or more), not {value!r}")
    return budget


def candidates(cache_dir: str | Path) -> list[Candidate]:
    """The entries under `cache_dir` (those that can be read now)."""
    found: list[Candidate] = []
    try:
        dirs = list((Path(cache_dir) / wc.ENTRIES_DIR).iterdir())
    except OSError:
        return found
    for entry in dirs:
        try:
            nbytes = (entry / wc.DATA_FILE).stat().st_size
            last_used = entry.stat().st_mtime
        except OSError:  # being built or evicted
            continue
        found.append(Candidate(entry, nbytes, last_used))
    return found


class Registry:
    """Registered mappings by entry. Thread-safe; `held` keeps a region registered while a copy
    reads it."""

    def __init__(self, host: HostMemory) -> None:
        self.host = host
        self._by_entry: dict[Path, Registration] = {}
        self._lock = threading.Lock()

    def register_entries(self, cache_dir: str | Path, max_bytes: int | None) -> list[Registration]:
        """Map and register the entries of `cache_dir` that fit in `max_bytes` (None: all),
        counting those registered already; returns the new registrations. An entry the driver
        refuses is logged and passed over."""
        with self._lock:
            held = sum(r.nbytes for r in self._by_entry.values())
            budget = None if max_bytes is None else max(0, max_bytes - held)
            fresh = [c for c in candidates(cache_dir) if c.entry.resolve() not in self._by_entry]
            added: list[Registration] = []
            for candidate in choose(fresh, budget):
                registration = self._register(candidate.entry)
                if registration is not None:
                    self._by_entry[registration.entry] = registration
                    added.append(registration)
            return added

    def lookup(self, entry: Path) -> wc.MappedWeights | None:
        """The registered mapping of `entry`, if its weights.bin is still the file that was
        mapped; a registration whose file has changed or gone is dropped."""
        key = entry.resolve()
        with self._lock:
            registration = self._by_entry.get(key)
            if registration is None:
                return None
            if _file_id(registration.entry) != registration.file_id:
                self._drop(key)
                return None
            mapped = registration.mapped
            return wc.MappedWeights(mapped.entry, dict(mapped.tensors), mapped.nbytes)

    def covers(self, ptr: int, nbytes: int) -> bool:
        with self._lock:
            return covers(((r.ptr, r.nbytes) for r in self._by_entry.values()), ptr, nbytes)

    @contextmanager
    def held(self, ptr: int, nbytes: int) -> Iterator[bool]:
        """Whether [ptr, ptr + nbytes) is registered; if so it stays so until the block ends."""
        with self._lock:
            yield covers(((r.ptr, r.nbytes) for r in self._by_entry.values()), ptr, nbytes)

    def keep_only(self, entry: Path | None) -> None:
        """Unregister every entry but `entry`, so the cache may evict them."""
        key = entry.resolve() if entry is not None else None
        with self._lock:
            for other in [k for k in self._by_entry if k != key]:
                self._drop(other)

    def release(self) -> None:
        self.keep_only(None)

    def entries(self) -> list[Path]:
        with self._lock:
            return list(self._by_entry)

    def _register(self, entry: Path) -> Registration | None:
        file_id = _file_id(entry)  # before mapping: a file swapped in between fails `lookup`
        mapped = wc.map_entry(entry, touch=False)  # registering ahead is not a use
        if file_id is None or mapped is None or not mapped.tensors:
            return None
        storage = next(iter(mapped.tensors.values())).untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        code = self.host.register(ptr, nbytes)
        if code != 0:
            log.warning("cudaHostRegister refused %s (cudaError %d); not registered", entry, code)
            return None  # the mapping goes with `mapped`, and the entry's flock with it
        return Registration(entry.resolve(), file_id, mapped, ptr, nbytes)

    def _drop(self, key: Path) -> None:
        registration = self._by_entry.pop(key)
        # The mapping stays valid for whoever still holds its tensors; only the pages' lock goes.
        self.host.unregister(registration.ptr)


def _file_id(entry: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(entry / wc.DATA_FILE)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


REGISTRY = Registry(CudaHost())


def register_entries(cache_dir: str | Path, max_bytes: int | None) -> list[Registration]:
    """The process's registry: see `Registry.register_entries`."""
    return REGISTRY.register_entries(cache_dir, max_bytes)


def lookup(entry: Path) -> wc.MappedWeights | None:
    return REGISTRY.lookup(entry)


def keep_only(entry: Path | None) -> None:
    REGISTRY.keep_only(entry)


def release() -> None:
    REGISTRY.release()
