"""The node's DRAM cache: convert once, LRU within a budget, never evict what is mapped,
concurrent preloads."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from dataplane.flowserve import weights_cache as wc
from dataplane.scaleout.dram_cache import DramCache
from dataplane.scaleout.errors import CacheFull

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the conversions the cache runs (one per model it did not hold)."""
    seen: list[str] = []
    convert = wc.load_ready_tensors

    def counting(model_path: str | Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        seen.append(str(model_path))
        time.sleep(0.05)  # widen the window for a racing preload
        return convert(model_path, dtype)

    monkeypatch.setattr(wc, "load_ready_tensors", counting)
    return seen


def entry_size(model_dir: Path) -> int:
    return wc.entry_nbytes(wc.load_ready_tensors(model_dir, torch.float32))


def test_preload_converts_once_then_hits(
    tiny_dir: Path, tmp_path: Path, conversions: list[str]
) -> None:
    cache = DramCache(tmp_path)
    assert cache.lookup(tiny_dir) is None
    first = cache.preload(tiny_dir)
    again = cache.preload(tiny_dir)
    assert conversions == [str(tiny_dir)]
    assert again.path == first.path == cache.lookup(tiny_dir).path  # type: ignore[union-attr]
    assert first.dtype == "float32" and first.model == str(tiny_dir.resolve())
    assert cache.used_bytes() == first.nbytes and not first.in_use


def test_the_least_recently_used_entry_goes_first(
    tiny_dir: Path, tiny2_dir: Path, tiny3_dir: Path, tmp_path: Path
) -> None:
    cache = DramCache(tmp_path, budget_bytes=2 * entry_size(tiny_dir) + 1)
    a = cache.preload(tiny_dir)
    cache.preload(tiny2_dir)
    os.utime(a.path, (time.time() + 5, time.time() + 5))  # as if `a` was mapped just now
    cache.preload(tiny3_dir)
    assert cache.lookup(tiny2_dir) is None
    assert cache.lookup(tiny_dir) is not None and cache.lookup(tiny3_dir) is not None
    assert cache.used_bytes() <= cache.budget_bytes


def test_a_mapped_entry_is_never_evicted(tiny_dir: Path, tiny2_dir: Path, tmp_path: Path) -> None:
    cache = DramCache(tmp_path, budget_bytes=entry_size(tiny_dir) + 1)
    entry = cache.preload(tiny_dir)
    mapped = wc.map_entry(entry.path)
    assert mapped is not None and cache.entries()[0].in_use
    with pytest.raises(CacheFull):
        cache.preload(tiny2_dir)
    assert not cache.evict(entry.name)
    assert cache.lookup(tiny_dir) is not None
    del mapped  # the instance is gone, and its mapping with it
    gc.collect()
    cache.preload(tiny2_dir)
    assert cache.lookup(tiny_dir) is None


def test_a_model_larger_than_the_budget_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CacheFull):
        DramCache(tmp_path, budget_bytes=4096).preload(tiny_dir)
    assert not list((tmp_path / "building").iterdir())


def test_concurrent_preloads_of_one_model_convert_it_once(
    tiny_dir: Path, tmp_path: Path, conversions: list[str]
) -> None:
    # Each thread opens the lock files itself, so they contend like processes do.
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(DramCache(tmp_path).preload(tiny_dir).path))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert conversions == [str(tiny_dir)]


def test_builds_of_dead_preloaders_are_cleared(tiny_dir: Path, tmp_path: Path) -> None:
    cache = DramCache(tmp_path)
    stale = tmp_path / "building" / "x-float32-0123.999999999.abcd"
    stale.mkdir()
    cache.preload(tiny_dir)
    assert not stale.exists()


@pytest.mark.slow
def test_two_processes_preloading_at_once(tiny_dir: Path, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "dataplane.scaleout.dram_cache", "--root", str(tmp_path),
        "preload", str(tiny_dir),
    ]  # fmt: skip
    procs = [
        subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]  # the same entry
    assert len(DramCache(tmp_path).entries()) == 1
    assert not list((tmp_path / "building").iterdir())
