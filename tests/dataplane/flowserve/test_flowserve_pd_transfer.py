"""The K/V transfer's serialized form and the prefill side's store: round trips in every dtype,
corrupt input refused, a byte cap, expiry of unfetched transfers (memory and files), and the
decode side's checks on where it reads from."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import pytest
import torch

from controlplane.wire import KVHandle
from dataplane.flowserve.kv_transfer import (
    KVStore,
    KVTransferConfig,
    KVTransferError,
    decode,
    encode_header,
    fetch,
    payload,
    serialized_size,
)
from dataplane.flowserve.prompt_kv import PromptKV, prompt_digest


def sample_kv(dtype: torch.dtype = torch.float32, num_tokens: int = 5) -> PromptKV:
    kv = torch.randn(2, 2, num_tokens, 3, 8).to(dtype)
    return PromptKV(kv, 7, prompt_digest(list(range(num_tokens))))


def serialized(kv: PromptKV) -> bytearray:
    return bytearray(encode_header(kv) + bytes(payload(kv)))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip(dtype: torch.dtype) -> None:
    kv = sample_kv(dtype)
    data = serialized(kv)
    assert len(data) == serialized_size(kv)
    back = decode(data)
    assert back.kv.dtype == dtype and torch.equal(back.kv, kv.kv)
    assert (back.first_token_id, back.prompt_digest) == (7, kv.prompt_digest)


def test_corrupt_transfers_are_refused() -> None:
    data = serialized(sample_kv())
    for bad in (data[:-1], data + b"x", b"XXXX" + data[4:], data[:6], bytearray()):
        with pytest.raises(KVTransferError):
            decode(bytearray(bad))
    header_end = len(encode_header(sample_kv()))
    mangled = bytearray(data[:header_end].replace(b"float32", b"float64") + data[header_end:])
    with pytest.raises(KVTransferError):
        decode(mangled)


def test_store_holds_streams_until_sent_and_caps_bytes(tmp_path: Path) -> None:
    kv = sample_kv()
    size = serialized_size(kv)
    store = KVStore(KVTransferConfig(tmp_path, max_bytes=2 * size))
    stored = store.put("a", "stream", kv)
    assert (stored.num_bytes, stored.path) == (size, None)
    store.put("b", "shm", kv)
    assert (store.num_transfers, store.num_bytes) == (2, 2 * size)
    with pytest.raises(KVTransferError, match="cap"):
        store.put("c", "stream", kv)

    chunks = store.stream("a")
    assert chunks is not None
    assert store.num_transfers == 2  # until the last chunk is taken
    assert decode(bytearray(b"".join(bytes(c) for c in chunks))).kv.equal(kv.kv)
    assert store.stream("a") is None and store.num_transfers == 1
    assert store.stream("b") is None  # an shm transfer is read from its file, not streamed

    assert store.discard("b") and not (tmp_path / "b.kv").exists()
    assert not store.discard("b")
    store.put("c", "stream", kv)  # room again


def test_unfetched_transfers_expire(tmp_path: Path) -> None:
    clock = Clock()
    store = KVStore(KVTransferConfig(tmp_path, ttl_s=10.0), clock=clock)
    store.put("s", "shm", sample_kv())
    store.put("m", "stream", sample_kv())
    assert (tmp_path / "s.kv").exists()
    clock.now += 9.0
    assert store.expire() == []
    clock.now += 1.0
    assert {t.transfer_id for t in store.expire()} == {"s", "m"}
    assert store.num_transfers == 0 and store.num_bytes == 0
    assert list(tmp_path.iterdir()) == []
    assert store.stream("m") is None

    # An shm file the decode instance took stops counting at the next sweep.
    store.put("t", "shm", sample_kv())
    (tmp_path / "t.kv").unlink()
    assert store.expire() == [] and store.num_transfers == 0

    # What a dead instance left behind goes when a store starts on the directory.
    stale = tmp_path / "old.kv"
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    fresh = tmp_path / "new.kv"
    fresh.write_bytes(b"x")
    KVStore(KVTransferConfig(tmp_path, ttl_s=10.0))
    assert not stale.exists() and fresh.exists()

    store.put("u", "shm", sample_kv())
    store.close()
    assert not (tmp_path / "u.kv").exists()


def test_shm_fetch_reads_once_and_only_transfer_files(tmp_path: Path) -> None:
    asyncio.run(shm_fetch(tmp_path))


async def shm_fetch(tmp_path: Path) -> None:
    config = KVTransferConfig(tmp_path)
    store = KVStore(config)
    kv = sample_kv()
    stored = store.put("x1", "shm", kv)
    assert stored.path is not None
    handle = KVHandle(
        transfer_id="x1",
        transport="shm",
        location=str(stored.path),
        num_tokens=kv.num_tokens,
        num_bytes=stored.num_bytes,
        first_token_id=kv.first_token_id,
        export_s=0.0,
    )
    async with httpx.AsyncClient() as client:
        fetched = await fetch(handle, config, client)
        assert torch.equal(fetched.kv.kv, kv.kv) and fetched.num_bytes == stored.num_bytes
        assert not stored.path.exists()  # the decode side deletes what it read
        with pytest.raises(KVTransferError, match="expired or taken"):
            await fetch(handle, config, client)

        outside = tmp_path.parent / "elsewhere.kv"
        outside.write_bytes(b"keep me")
        for location in (str(outside), str(tmp_path / "x1.kv.other"), "relative/x1.kv"):
            with pytest.raises(KVTransferError, match="not a K/V transfer file"):
                await fetch(handle.model_copy(update={"location": location}), config, client)
        assert outside.read_bytes() == b"keep me"

        store.put("x2", "shm", kv)
        wrong = handle.model_copy(
            update={"transfer_id": "x2", "location": str(tmp_path / "x2.kv"), "first_token_id": 8}
        )
        with pytest.raises(KVTransferError, match="its handle says"):
            await fetch(wrong, config, client)
