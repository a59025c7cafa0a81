"""A node's DRAM preload cache: models converted once to FlowServe's load-ready layout
(`dataplane.flowserve.weights_cache`) and kept in shared memory, so that an instance's weight
load is a mapping of pages already in DRAM, shared by every instance of the node.

    <root>/entries/<name>/        one model in one dtype (index.json, weights.bin)
    <root>/building/<name>.<pid>.<rand>/   an entry being written, renamed into entries/ whole
    <root>/locks/<name>.lock      held while one process converts <name>: a second waits, then
                                  finds the entry there
    <root>/cache.lock             held while making room and committing an entry

The budget caps the bytes of all entries. Making room evicts the least recently mapped entries
first, and never one a live process maps (it holds a shared flock on the entry's weights.bin;
eviction needs an exclusive one). Any number of processes may preload at once.

`python -m dataplane.scaleout.dram_cache preload MODEL_DIR` preloads from the command line, so a
caller that does not import torch (the node agent) can preload in a child process.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dataplane.flowserve import weights_cache as wc
from dataplane.flowserve.config import DTYPES, resolve_device, resolve_dtype
from dataplane.scaleout.errors import CacheFull
from dataplane.scaleout.settings import CACHE_ROOT_ENV, DEFAULT_CACHE_ROOT, default_cache_root

DEFAULT_BUDGET_SHARE = 0.5  # of the cache's filesystem (tmpfs: of DRAM)


@dataclass(frozen=True, slots=True)
class CacheEntry:
    name: str
    path: Path
    model: str  # the source folder
    nbytes: int
    last_used: float  # when it was last mapped or preloaded (the LRU clock)
    in_use: bool  # some live process maps it

    @property
    def dtype(self) -> str:
        return self.name.rsplit("-", 2)[-2]


def resolve_cache_dtype(dtype: str | None) -> torch.dtype:
    """The dtype an engine on this node would load `dtype` as (None: the device's default)."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    return resolve_dtype(dtype, resolve_device(None))  # type: ignore[arg-type]


class DramCache:
    def __init__(self, root: str | Path | None = None, budget_bytes: int | None = None) -> None:
        """`budget_bytes` None: half of the size of the filesystem holding `root`."""
        self.root = Path(root) if root is not None else default_cache_root()
        for sub in (wc.ENTRIES_DIR, "building", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if budget_bytes is None:
            stat = os.statvfs(self.root)
            budget_bytes = int(stat.f_blocks * stat.f_frsize * DEFAULT_BUDGET_SHARE)
        if budget_bytes < 1:
            raise ValueError(f"the cache budget must be positive, not {budget_bytes} bytes")
        self.budget_bytes = budget_bytes

    # -- queries -------------------------------------------------------------------------------

    def lookup(self, model_path: str | Path, dtype: str | None = None) -> CacheEntry | None:
        entry = wc.entry_dir(self.root, model_path, resolve_cache_dtype(dtype))
        return self._read(entry)

    def entries(self) -> list[CacheEntry]:
        """Every entry, least recently used first."""
        found = [self._read(p) for p in (self.root / wc.ENTRIES_DIR).iterdir()]
        return sorted((e for e in found if e is not None), key=lambda e: e.last_used)

    def used_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries())

    # -- commands ------------------------------------------------------------------------------

    def preload(self, model_path: str | Path, dtype: str | None = None) -> CacheEntry:
        """Make the cache hold the model (converting it if it does not); returns its entry.
        Raises CacheFull when the budget cannot hold it, ConfigError for a folder that does
        not load."""
        torch_dtype = resolve_cache_dtype(dtype)
        entry = wc.entry_dir(self.root, model_path, torch_dtype)
        with _flock(self.root / "locks" / f"{entry.name}.lock"):
            if (found := self._read(entry)) is not None:
                os.utime(entry)
                return found
            tensors = wc.load_ready_tensors(model_path, torch_dtype)
            needed = wc.entry_nbytes(tensors)
            with _flock(self.root / "cache.lock"):
                self._clear_stale_builds()
                self._make_room(needed)
                building = self.root / "building" / f"{entry.name}.{os.getpid()}.{_rand()}"
                try:
                    wc.write_entry(tensors, building, model=str(Path(model_path).resolve()))
                    os.rename(building, entry)
                finally:
                    shutil.rmtree(building, ignore_errors=True)
        found = self._read(entry)
        assert found is not None, "an entry just committed is readable"
        return found

    def evict(self, name: str) -> bool:
        """Drop one entry; False when a live process maps it (or it is not there)."""
        with _flock(self.root / "cache.lock"):
            return self._try_evict(self.root / wc.ENTRIES_DIR / name)

    # -- internals -----------------------------------------------------------------------------

    def _make_room(self, needed: int) -> None:
        entries = self.entries()
        used = sum(e.nbytes for e in entries)
        free = _fs_free(self.root)
        for old in entries:
            if used + needed <= self.budget_bytes and needed <= free:
                return
            if self._try_evict(old.path):
                used -= old.nbytes
                free += old.nbytes
        if used + needed > self.budget_bytes or needed > free:
            raise CacheFull(needed, min(self.budget_bytes, used + free), used)

    def _try_evict(self, entry: Path) -> bool:
        try:
            fd = os.open(entry / wc.DATA_FILE, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # mapped by a live process
            # Moved away first (one rename), so no reader ever sees half an entry.
            trash = self.root / "building" / f"evicted-{entry.name}.{_rand()}"
            os.rename(entry, trash)
            shutil.rmtree(trash, ignore_errors=True)
            return True
        finally:
            os.close(fd)

    def _clear_stale_builds(self) -> None:
        """Builds of preloaders that died midway (their pid is in the name)."""
        for path in (self.root / "building").iterdir():
            parts = path.name.rsplit(".", 2)
            alive = len(parts) == 3 and parts[1].isdigit() and _pid_alive(int(parts[1]))
            if not alive:
                shutil.rmtree(path, ignore_errors=True)

    def _read(self, entry: Path) -> CacheEntry | None:
        try:
            index = json.loads((entry / wc.INDEX_FILE).read_text())
            last_used = entry.stat().st_mtime
        except (OSError, ValueError):
            return None
        return CacheEntry(
            name=entry.name,
            path=entry,
            model=str(index.get("model", "")),
            nbytes=int(index["nbytes"]),
            last_used=last_used,
            in_use=in_use(entry),
        )


def in_use(entry: Path) -> bool:
    """Whether some process maps the entry (holds its shared flock): the cache cannot evict it."""
    try:
        fd = os.open(entry / wc.DATA_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock, if it got one


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fs_free(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rand() -> str:
    return uuid.uuid4().hex[:8]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataplane.scaleout.dram_cache")
    parser.add_argument(
        "--root", default=None, help=f"default ${CACHE_ROOT_ENV} or {DEFAULT_CACHE_ROOT}"
    )
    parser.add_argument("--budget", type=int, default=None, help="bytes (default: half the fs)")
    commands = parser.add_subparsers(dest="command", required=True)
    preload = commands.add_parser("preload", help="convert a model folder into the cache")
    preload.add_argument("model")
    preload.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    commands.add_parser("list", help="the entries, least recently used first")
    evict = commands.add_parser("evict", help="drop an entry no live process maps")
    evict.add_argument("name")
    args = parser.parse_args(argv)
    cache = DramCache(args.root, args.budget)
    if args.command == "preload":
        try:
            entry = cache.preload(args.model, args.dtype)
        except CacheFull as exc:
            print(f"dram_cache: {exc}", file=sys.stderr)
            return 1
        print(json.dumps({"name": entry.name, "path": str(entry.path), "nbytes": entry.nbytes}))
    elif args.command == "list":
        for e in cache.entries():
            print(f"{e.name}\t{e.nbytes}\t{'in use' if e.in_use else '-'}\t{e.model}")
    else:
        return 0 if cache.evict(args.name) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
