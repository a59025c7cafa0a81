"""Load-ready weights: a model's tensors as FlowServe holds them after its own load-time
conversions (fused q/k/v and gate/up, the engine's dtype), in one flat file that a node keeps in
shared memory (docs/scaling.md). Instances map the file read-only with MAP_SHARED, so every
instance of a node shares one physical copy, and loading is building the model over views of
the mapping: no read, no conversion, no copy.

    <cache>/entries/<name>/index.json   {"format", "model", "dtype", "nbytes",
                                         "tensors": {name: {"dtype", "shape", "offset"}}}
    <cache>/entries/<name>/weights.bin  every tensor at its offset (4 KiB aligned)

`<name>` (`entry_name`) is the folder's name, the dtype and a hash of the folder's path and its
weight and config files' sizes and mtimes, so a changed folder is a different entry.

A process that maps an entry holds a shared flock on its weights.bin for as long as it maps it
(forked children share it); the node's cache (`dataplane.scaleout.dram_cache`) evicts only an
entry it can lock exclusively. This module reads and writes entries; deciding what to keep is
the cache's business. A warm pod on a GPU maps and registers entries ahead of need
(`registered_cache`); `open_cached` then gives back that mapping.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from dataplane.flowserve.weights import weight_files

if TYPE_CHECKING:
    from dataplane.flowserve.device_upload import UploadMethod

log = logging.getLogger(__name__)

FORMAT = 1
ALIGN = 4096
INDEX_FILE = "index.json"
DATA_FILE = "weights.bin"
ENTRIES_DIR = "entries"


@dataclass(slots=True)
class MappedWeights:
    """An entry mapped into this process: `tensors` are views of one read-only shared mapping
    (writing to them faults: an instance never changes the cache's pages). The mapping holds
    the entry's shared flock on a duplicate of its file descriptor, so the entry stays pinned
    exactly as long as something maps it (the tensors, or a forked child's copy of them)."""

    entry: Path
    tensors: dict[str, torch.Tensor]
    nbytes: int


def entry_name(model_path: str | Path, dtype: torch.dtype) -> str:
    folder = Path(model_path).resolve()
    digest = hashlib.sha256(f"{FORMAT}\0{folder}\0{dtype}".encode())
    for file in [*weight_files(folder), folder / "config.json"]:
        stat = file.stat()
        digest.update(f"\0{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    label = re.sub(r"[^A-Za-z0-9._-]", "_", folder.name)[:64] or "model"
    return f"{label}-{_dtype_name(dtype)}-{digest.hexdigest()[:16]}"


def entry_dir(cache_dir: str | Path, model_path: str | Path, dtype: torch.dtype) -> Path:
    return Path(cache_dir) / ENTRIES_DIR / entry_name(model_path, dtype)


def load_ready_tensors(model_path: str | Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state as the engine holds it on the CPU: what an entry stores. Non-persistent
    buffers (rope tables) are left out; the model computes them again at load."""
    from dataplane.flowserve.models import load_model  # the model code imports this module

    model, _ = load_model(model_path, dtype, torch.device("cpu"))
    return {name: t.detach() for name, t in model.state_dict().items()}


def entry_layout(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, Any]], int]:
    """Each tensor's index record, and the data size in bytes."""
    layout: dict[str, dict[str, Any]] = {}
    offset = 0
    for name, tensor in tensors.items():
        offset = _align(offset)
        layout[name] = {
            "dtype": _dtype_name(tensor.dtype),
            "shape": list(tensor.shape),
            "offset": offset,
        }
        offset += tensor.numel() * tensor.element_size()
    return layout, _align(offset)


def entry_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return entry_layout(tensors)[1]


def write_entry(tensors: Mapping[str, torch.Tensor], dest: Path, *, model: str) -> int:
    """Write an entry into the new directory `dest`; returns its data size in bytes."""
    layout, nbytes = entry_layout(tensors)
    dest.mkdir(parents=True)
    with (dest / DATA_FILE).open("wb") as f:
        f.truncate(nbytes)
        for name, tensor in tensors.items():
            f.seek(layout[name]["offset"])
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            f.write(data.numpy().data)
    index = {"format": FORMAT, "model": model, "nbytes": nbytes, "tensors": layout}
    (dest / INDEX_FILE).write_text(json.dumps(index, separators=(",", ":")))
    return nbytes


def map_entry(entry: Path, *, touch: bool = True) -> MappedWeights | None:
    """Map an entry read-only and shared, or None when it is absent or being evicted. `touch`:
    count this as a use on the cache's LRU clock (not when mapping ahead of need)."""
    try:
        fd = os.open(entry / DATA_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        # An eviction that won the race has unlinked the file or moved the entry away.
        same = os.fstat(fd).st_ino == os.stat(entry / DATA_FILE).st_ino
        index = json.loads((entry / INDEX_FILE).read_text())
        if not same or index.get("format") != FORMAT:
            os.close(fd)
            return None
    except (OSError, ValueError):
        os.close(fd)
        return None
    nbytes = int(index["nbytes"])
    # MAP_POPULATE fills the page tables now, in one pass, rather than by a fault per page on
    # the first forward pass.
    try:
        # Python's mmap keeps a dup of `fd`: the flock lives on with the mapping.
        buffer = mmap.mmap(
            fd, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ
        )
    finally:
        os.close(fd)
    with warnings.catch_warnings():  # "not writable": intended, the weights are read-only
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(buffer, dtype=torch.uint8)  # keeps `buffer` alive
    tensors: dict[str, torch.Tensor] = {}
    for name, spec in index["tensors"].items():
        dtype = getattr(torch, spec["dtype"])
        shape = [int(n) for n in spec["shape"]]
        size = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        start = int(spec["offset"])
        tensors[name] = flat[start : start + size].view(dtype).view(shape)
    if touch:
        _touch(entry)
    return MappedWeights(entry, tensors, nbytes)


def open_cached(
    cache_dir: str | Path, model_path: str | Path, dtype: torch.dtype
) -> MappedWeights | None:
    """The model's entry in the cache at `cache_dir`, mapped; None on a miss. An entry this
    process registered ahead (`registered_cache`) is that mapping, at the registered address."""
    try:
        entry = entry_dir(cache_dir, model_path, dtype)
    except OSError:  # the folder cannot be read: let the disk loader say why
        return None
    from dataplane.flowserve import registered_cache  # it imports this module

    registered = registered_cache.lookup(entry)
    if registered is not None:
        _touch(entry)
        return registered
    return map_entry(entry)


def _touch(entry: Path) -> None:
    """The cache evicts the least recently mapped entry first: its directory's mtime."""
    try:
        os.utime(entry)
    except OSError:
        pass


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(slots=True)
class ReadyWeights:
    """Where an engine's weights come from: tensors handed in (a fork's zygote holds them),
    another instance's on the same GPU (opened through CUDA IPC, or copied from them), an
    entry of the node's DRAM cache (on a GPU: uploaded in one pass), or, with `tensors` None,
    the folder on disk."""

    source: Literal["disk", "dram_cache", "zygote", "cuda_ipc", "device_copy"]
    tensors: Mapping[str, torch.Tensor] | None = None
    mapped: MappedWeights | None = None
    upload_method: UploadMethod | None = None  # how a DRAM cache entry went onto the GPU


def ready_weights(
    given: Mapping[str, torch.Tensor] | None,
    cache_dir: str | Path | None,
    model_path: str | Path,
    dtype: torch.dtype,
    *,
    device: torch.device | None = None,
    peer: str | None = None,
    peer_mode: Literal["copy", "share"] = "copy",
) -> ReadyWeights:
    """`peer`: a running instance's weight socket (dataplane.scaleout.cuda_share), tried first
    on CUDA; a peer that cannot give them is passed over (logged) for the cache, then disk.

    This process serves one model from here on: the entries it registered ahead for others
    (`registered_cache`) are released, so that the node's cache may evict them."""
    from dataplane.flowserve import registered_cache  # it imports this module

    weights = _ready_weights(given, cache_dir, model_path, dtype, device, peer, peer_mode)
    registered_cache.keep_only(weights.mapped.entry if weights.mapped is not None else None)
    return weights


def _ready_weights(
    given: Mapping[str, torch.Tensor] | None,
    cache_dir: str | Path | None,
    model_path: str | Path,
    dtype: torch.dtype,
    device: torch.device | None,
    peer: str | None,
    peer_mode: Literal["copy", "share"],
) -> ReadyWeights:
    if given is not None:
        return ReadyWeights("zygote", given)
    on_cuda = device is not None and device.type == "cuda"
    if peer is not None and on_cuda:
        assert device is not None
        from dataplane.scaleout.cuda_share import ShareError, import_weights

        try:
            imported = import_weights(peer, device, dtype, peer_mode)
            return ReadyWeights(imported.source, imported.tensors)
        except ShareError as exc:
            log.warning("weights from the instance at %s: %s; trying the cache", peer, exc)
    mapped = None if cache_dir is None else open_cached(cache_dir, model_path, dtype)
    if mapped is None:
        return ReadyWeights("disk")
    if on_cuda:
        assert device is not None
        from dataplane.flowserve.device_upload import UploadError, upload

        try:
            up = upload(mapped.tensors, device)
            log.info(
                "%s onto %s by %s: %.3f s, %.1f GB/s",
                mapped.entry.name,
                device,
                up.method,
                up.seconds,
                up.gb_per_s,
            )
            return ReadyWeights("dram_cache", up.tensors, mapped, up.method)
        except UploadError as exc:  # the model copies them in, tensor by tensor
            log.warning("one-pass upload of %s: %s", mapped.entry, exc)
    return ReadyWeights("dram_cache", mapped.tensors, mapped)
