"""Entries registered ahead: which are chosen, what a lookup gives back, what stays pinned, and
that the engine's weights come from the registered mapping. The driver is a stand-in here
(registration itself runs in test_scaleout_cuda_gpu.py)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

from dataplane.flowserve import registered_cache as rc
from dataplane.flowserve import weights_cache as wc
from dataplane.flowserve.device_upload import UploadError, choose_method, upload
from dataplane.scaleout.dram_cache import DramCache, in_use


class FakeHost:
    """Records what is registered; refuses everything when `refuse`."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.registered: dict[int, int] = {}

    def register(self, ptr: int, nbytes: int) -> int:
        if self.refuse:
            return 1  # cudaErrorInvalidValue
        assert ptr not in self.registered, "registered twice"
        self.registered[ptr] = nbytes
        return 0

    def unregister(self, ptr: int) -> None:
        del self.registered[ptr]  # a KeyError: unregistered twice, or never registered


def make_entry(root: Path, name: str, nbytes: int, last_used: float) -> Path:
    entry = root / wc.ENTRIES_DIR / name
    tensors = {"w": torch.arange(nbytes, dtype=torch.int64).to(torch.uint8)}
    wc.write_entry(tensors, entry, model=name)
    os.utime(entry, (last_used, last_used))
    return entry


def pinned(entry: Path) -> bool:
    """Whether some mapping holds the entry's flock (the cache could not evict it)."""
    gc.collect()  # a mapping only garbage still refers to is no holder
    return in_use(entry)


def candidate(name: str, nbytes: int, last_used: float) -> rc.Candidate:
    return rc.Candidate(Path(name), nbytes, last_used)


def test_the_most_recently_used_entries_that_fit_are_chosen() -> None:
    a, b, c = candidate("a", 10, 1.0), candidate("b", 30, 3.0), candidate("c", 20, 2.0)
    assert rc.choose([a, b, c], None) == [b, c, a]
    assert rc.choose([a, b, c], 40) == [b, a]  # c no longer fits, a still does
    assert rc.choose([a, b, c], 60) == [b, c, a]
    assert rc.choose([a, b, c], 0) == []


def test_a_range_is_covered_only_inside_one_region() -> None:
    regions = [(100, 50), (400, 10)]
    assert rc.covers(regions, 100, 50)
    assert rc.covers(regions, 120, 10)
    assert rc.covers(regions, 400, 10)
    assert not rc.covers(regions, 140, 20)  # runs past the end
    assert not rc.covers(regions, 90, 20)  # starts before
    assert not rc.covers(regions, 100, 310)  # spans both
    assert not rc.covers([], 100, 1)


def test_the_budget_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(rc.BUDGET_ENV, raising=False)
    assert rc.budget_from_env() is None
    monkeypatch.setenv(rc.BUDGET_ENV, "0")
    assert rc.budget_from_env() == 0
    monkeypatch.setenv(rc.BUDGET_ENV, str(8 << 30))
    assert rc.budget_from_env() == 8 << 30
    for bad in ("-1", "lots", "1.5"):
        monkeypatch.setenv(rc.BUDGET_ENV, bad)
        with pytest.raises(ValueError, match=rc.BUDGET_ENV):
            rc.budget_from_env()


def test_entries_are_registered_within_the_budget_without_touching_the_lru_clock(
    tmp_path: Path,
) -> None:
    old = make_entry(tmp_path, "old", 3 * wc.ALIGN, 1000.0)
    new = make_entry(tmp_path, "new", 2 * wc.ALIGN, 3000.0)
    mid = make_entry(tmp_path, "mid", 2 * wc.ALIGN, 2000.0)
    host = FakeHost()
    registry = rc.Registry(host)
    added = registry.register_entries(tmp_path, 5 * wc.ALIGN)
    assert [r.entry for r in added] == [new.resolve(), mid.resolve()]
    assert host.registered == {r.ptr: r.nbytes for r in added}
    assert all(r.nbytes == 2 * wc.ALIGN for r in added)
    assert [e.stat().st_mtime for e in (old, mid, new)] == [1000.0, 2000.0, 3000.0]
    # What is registered already counts: nothing more fits; no bound adds the rest, once.
    assert registry.register_entries(tmp_path, 5 * wc.ALIGN) == []
    assert [r.entry for r in registry.register_entries(tmp_path, None)] == [old.resolve()]
    assert registry.register_entries(tmp_path, None) == []
    assert len(host.registered) == 3


def test_no_cache_registers_nothing(tmp_path: Path) -> None:
    assert rc.Registry(FakeHost()).register_entries(tmp_path / "absent", None) == []


def test_a_lookup_gives_back_the_registered_mapping(tmp_path: Path) -> None:
    entry = make_entry(tmp_path, "a", wc.ALIGN, 1000.0)
    registry = rc.Registry(FakeHost())
    (registration,) = registry.register_entries(tmp_path, None)
    mapped = registry.lookup(entry)
    assert mapped is not None
    assert mapped.tensors["w"].untyped_storage().data_ptr() == registration.ptr
    assert torch.equal(mapped.tensors["w"], registration.mapped.tensors["w"])
    assert registry.covers(registration.ptr, registration.nbytes)
    assert registry.lookup(tmp_path / wc.ENTRIES_DIR / "other") is None


def test_a_registered_entry_is_pinned_until_released(tmp_path: Path) -> None:
    entry = make_entry(tmp_path, "a", wc.ALIGN, 1000.0)
    host = FakeHost()
    registry = rc.Registry(host)
    added = registry.register_entries(tmp_path, None)
    assert pinned(entry)
    del added
    registry.release()
    assert host.registered == {}
    assert not pinned(entry)
    assert registry.lookup(entry) is None


def test_an_entry_the_driver_refuses_is_passed_over_and_not_pinned(tmp_path: Path) -> None:
    entry = make_entry(tmp_path, "a", wc.ALIGN, 1000.0)
    registry = rc.Registry(FakeHost(refuse=True))
    assert registry.register_entries(tmp_path, None) == []
    assert registry.lookup(entry) is None
    assert not pinned(entry)


def test_a_replaced_entry_is_dropped_and_unregistered(tmp_path: Path) -> None:
    entry = make_entry(tmp_path, "a", wc.ALIGN, 1000.0)
    host = FakeHost()
    registry = rc.Registry(host)
    registry.register_entries(tmp_path, None)
    data = entry / wc.DATA_FILE
    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(data.read_bytes())
    os.replace(fresh, data)  # another file (inode) at the same path
    assert registry.lookup(entry) is None
    assert host.registered == {}
    assert registry.entries() == []


def test_keep_only_unregisters_the_other_entries(tmp_path: Path) -> None:
    a = make_entry(tmp_path, "a", wc.ALIGN, 1000.0)
    make_entry(tmp_path, "b", wc.ALIGN, 2000.0)
    host = FakeHost()
    registry = rc.Registry(host)
    registry.register_entries(tmp_path, None)
    registry.keep_only(a)
    assert registry.entries() == [a.resolve()]
    assert len(host.registered) == 1
    registry.keep_only(None)
    assert registry.entries() == [] and host.registered == {}


def test_the_upload_method_prefers_a_registered_region() -> None:
    assert choose_method(None, registered=True) == "registered"
    assert choose_method(None, registered=False) == "staged"
    assert choose_method("pageable", registered=True) == "pageable"  # $DEEPFLOW_UPLOAD_METHOD
    assert choose_method("registered", registered=False) == "registered"
    with pytest.raises(UploadError, match="DEEPFLOW_UPLOAD_METHOD"):
        choose_method("pinned", registered=True)


def test_registered_is_refused_for_a_region_that_is_not(tiny_dir: Path, tmp_path: Path) -> None:
    DramCache(tmp_path).preload(tiny_dir, "float32")
    mapped = wc.open_cached(tmp_path, tiny_dir, torch.float32)
    assert mapped is not None
    with pytest.raises(UploadError, match="not registered"):
        upload(mapped.tensors, torch.device("cpu"), "registered")


def test_the_engine_weights_come_from_the_registered_mapping(
    tiny_dir: Path, tiny2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = FakeHost()
    monkeypatch.setattr(rc, "REGISTRY", rc.Registry(host))
    cache = DramCache(tmp_path)
    mine = cache.preload(tiny_dir, "float32")
    other = cache.preload(tiny2_dir, "float32")
    os.utime(mine.path, (1000.0, 1000.0))
    added = rc.register_entries(tmp_path, None)
    assert {r.entry for r in added} == {mine.path.resolve(), other.path.resolve()}
    ptr = next(r.ptr for r in added if r.entry == mine.path.resolve())
    del added

    mapped = wc.open_cached(tmp_path, tiny_dir, torch.float32)
    assert mapped is not None
    assert next(iter(mapped.tensors.values())).untyped_storage().data_ptr() == ptr
    assert mine.path.stat().st_mtime > 1000.0  # a hit is a use on the cache's clock
    del mapped

    weights = wc.ready_weights(None, tmp_path, tiny_dir, torch.float32, device=torch.device("cpu"))
    assert weights.source == "dram_cache" and weights.mapped is not None
    assert weights.tensors is not None
    assert next(iter(weights.tensors.values())).untyped_storage().data_ptr() == ptr
    # This process serves one model now: the other entry is let go, and can be evicted.
    assert rc.REGISTRY.entries() == [mine.path.resolve()]
    assert list(host.registered) == [ptr]
    assert not pinned(other.path)
    assert cache.evict(other.name)
    rc.release()
