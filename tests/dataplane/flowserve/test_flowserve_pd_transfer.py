"""The K/V transfer's serialized form and the prefill side's store: round trips in every dtype,
corrupt input refused, a byte cap, expiry of unfetched transfers (memory and files), and the
decode side's checks on where it reads from. cuda_ipc's protocol with a stand-in for the
platform's device share: held once in device memory under its own cap, spilled to shm past it,
the decode side's fetch (and its refusal where it cannot map device memory), and the CUDA
handle's JSON form."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from controlplane.wire import KVHandle
from dataplane.flowserve.device_share import (
    RUNTIME,
    DeviceShareError,
    SharePeer,
    decode_handle,
    encode_handle,
)
from dataplane.flowserve.kv_cuda_ipc import SharedImports, share_answer
from dataplane.flowserve.kv_transfer import (
    KVStore,
    KVTransferConfig,
    KVTransferError,
    decode,
    encode_header,
    fetch,
    hold_export,
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


# --- cuda_ipc, its protocol on the CPU (CUDA IPC itself: test_flowserve_pd_ipc_gpu) -----------


class FakeShare:
    """The DeviceShare protocol within one process, without a GPU: a handle names a tensor in
    a registry and is taken once, as a CUDA IPC handle is."""

    def __init__(self, gpu: str = "GPU-0") -> None:
        self.gpu = gpu
        self.shared: dict[str, torch.Tensor] = {}
        self.to_host: list[bool] = []  # of each take

    def peer(self) -> SharePeer:
        return SharePeer(RUNTIME, (self.gpu,))

    def share(self, tensor: torch.Tensor, peer: SharePeer) -> dict[str, Any]:
        if self.gpu not in peer.devices:
            raise DeviceShareError(
                f"the tensor is on GPU {self.gpu}, which the importer cannot map"
            )
        key = uuid.uuid4().hex
        self.shared[key] = tensor
        return {"key": key}

    def take(self, shared: Mapping[str, Any], *, num_bytes: int, to_host: bool) -> torch.Tensor:
        tensor = self.shared.pop(shared.get("key", ""), None)
        if tensor is None:
            raise DeviceShareError("no such handle")
        assert tensor.numel() * tensor.element_size() == num_bytes
        self.to_host.append(to_host)
        return tensor.clone()


def ipc_handle(kv: PromptKV, transfer_id: str = "t1") -> KVHandle:
    return KVHandle(
        transfer_id=transfer_id,
        transport="cuda_ipc",
        location=f"http://prefill:8000/kv/{transfer_id}",
        num_tokens=kv.num_tokens,
        num_bytes=kv.num_bytes,
        first_token_id=kv.first_token_id,
        export_s=0.0,
    )


def test_store_holds_cuda_ipc_transfers_in_device_memory_and_shares_them_once(
    tmp_path: Path,
) -> None:
    kv = sample_kv()
    clock = Clock()
    config = KVTransferConfig(tmp_path, ttl_s=10.0, max_device_bytes=2 * kv.num_bytes)
    store = KVStore(config, clock=clock)
    stored = store.put("a", "cuda_ipc", kv)
    assert (stored.transport, stored.num_bytes, stored.path) == ("cuda_ipc", kv.num_bytes, None)
    assert store.device_bytes == kv.num_bytes and list(tmp_path.iterdir()) == []
    assert store.stream("a") is None  # not served through the host
    assert store.claim("a") is kv
    assert store.claim("a") is None  # one handle per transfer
    assert store.device_bytes == kv.num_bytes  # held until the decode instance deletes it

    store.put("b", "cuda_ipc", kv)
    with pytest.raises(KVTransferError, match="device memory"):
        store.put("c", "cuda_ipc", kv)
    store.put("c", "stream", kv)  # the device cap is the device's alone
    assert store.claim("c") is None and store.claim("nope") is None

    assert store.discard("a") and store.device_bytes == kv.num_bytes
    clock.now += 10.0
    assert {t.transfer_id for t in store.expire()} == {"b", "c"}
    assert store.device_bytes == 0 and store.num_bytes == 0


def test_exports_on_the_device_go_by_shm_past_the_device_cap(tmp_path: Path) -> None:
    kv = sample_kv()
    store = KVStore(KVTransferConfig(tmp_path, max_device_bytes=kv.num_bytes))
    held = hold_export(store, "d1", "shm", kv, on_device=True)
    assert held.transport == "cuda_ipc" and held.path is None
    spilled = hold_export(store, "d2", "shm", kv, on_device=True)
    assert spilled.transport == "shm" and spilled.path == tmp_path / "d2.kv"
    assert decode(bytearray(spilled.path.read_bytes())).kv.equal(kv.kv)
    # K/V on the host keep the transport asked for (cuda_ipc of the host: the shm file).
    assert hold_export(store, "h1", "shm", kv, on_device=False).transport == "shm"
    assert hold_export(store, "h2", "stream", kv, on_device=False).transport == "stream"
    assert hold_export(store, "h3", "cuda_ipc", kv, on_device=False).transport == "shm"


class Recorder:
    """A prefill instance's K/V routes, answered in process (httpx.MockTransport)."""

    def __init__(self, kv: PromptKV, share: FakeShare, status: int = 200) -> None:
        self.kv, self.share, self.status = kv, share, status
        self.requests: list[tuple[str, str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.path))
        if request.method == "DELETE":
            return httpx.Response(200, json={"deleted": True})
        if self.status != 200:
            body = {"error": {"message": "the importer cannot map it", "type": "x"}}
            return httpx.Response(self.status, json=body)
        answer = share_answer(self.kv, json.loads(request.content), self.share)
        return httpx.Response(200, json=answer)


def test_cuda_ipc_fetch_takes_the_shared_kv_then_deletes_the_transfer(tmp_path: Path) -> None:
    asyncio.run(cuda_ipc_fetch(tmp_path))


async def cuda_ipc_fetch(tmp_path: Path) -> None:
    kv, share = sample_kv(torch.bfloat16), FakeShare()
    config = KVTransferConfig(tmp_path)
    handle = ipc_handle(kv)
    recorder = Recorder(kv, share)
    async with httpx.AsyncClient(transport=httpx.MockTransport(recorder)) as client:
        imports = SharedImports(share, config.max_device_bytes)
        fetched = await fetch(handle, config, client, imports)
        assert torch.equal(fetched.kv.kv, kv.kv) and fetched.kv.prompt_digest == kv.prompt_digest
        assert fetched.num_bytes == kv.num_bytes == handle.num_bytes
        assert share.to_host == [False]  # a copy of its own, in device memory
        assert recorder.requests == [("POST", "/kv/t1/share"), ("DELETE", "/kv/t1")]

        # A decode instance whose platform cannot map device memory asks for no handle, and
        # drops the transfer so that the prefill instance frees it now.
        recorder.requests.clear()
        with pytest.raises(KVTransferError, match="cannot map another process's device memory"):
            await fetch(handle, config, client, None)
        assert recorder.requests == [("DELETE", "/kv/t1")]

        # A prefill instance that refuses the share: the fetch fails, the transfer is dropped.
        refusing = Recorder(kv, share, status=409)
        async with httpx.AsyncClient(transport=httpx.MockTransport(refusing)) as other:
            with pytest.raises(KVTransferError, match="409: the importer cannot map it"):
                await fetch(handle, config, other, imports)
        assert refusing.requests == [("POST", "/kv/t1/share"), ("DELETE", "/kv/t1")]

        recorder.requests.clear()
        for location in ("/dev/shm/t1.kv", "http://prefill:8000/kv/other"):
            with pytest.raises(KVTransferError, match="not a K/V transfer URL"):
                await fetch(handle.model_copy(update={"location": location}), config, client)
        assert recorder.requests == []
        assert imports.device_bytes == kv.num_bytes  # until the engine has written them
        del fetched
        await asyncio.sleep(0)  # the loop's handle that resumed the fetch holds its future
        gc.collect()
        assert imports.device_bytes == 0


def test_shared_imports_wait_on_the_host_past_the_device_cap() -> None:
    kv, share = sample_kv(), FakeShare()
    imports = SharedImports(share, max_device_bytes=kv.num_bytes)
    first = imports.take(share.share(kv.kv, share.peer()), kv.num_bytes)
    assert imports.device_bytes == kv.num_bytes
    second = imports.take(share.share(kv.kv, share.peer()), kv.num_bytes)
    assert share.to_host == [False, True] and imports.device_bytes == kv.num_bytes
    del first  # written into KV blocks and dropped by the engine
    gc.collect()
    assert imports.device_bytes == 0
    assert torch.equal(second, kv.kv)
    with pytest.raises(DeviceShareError):
        imports.take({"key": "gone"}, kv.num_bytes)
    with pytest.raises(DeviceShareError):
        imports.take(["not", "a", "handle"], kv.num_bytes)
    assert imports.device_bytes == 0


def cuda_args(counter: bytes = b"/torch_123_456") -> tuple[Any, ...]:
    """What torch's reduce_tensor gives for a CUDA tensor (its fields, made up)."""
    return (
        torch.Tensor, torch.Size([2, 2, 5, 3, 8]), (240, 120, 24, 8, 1), 0,
        torch.storage.TypedStorage, torch.bfloat16, 0, bytes(range(64)), 960, 512,
        False, counter, 7, bytes(64), True,
    )  # fmt: skip


def test_a_cuda_ipc_handle_travels_as_json_and_nothing_else_is_opened() -> None:
    shared = json.loads(json.dumps(encode_handle(cuda_args())))
    opened = decode_handle(shared, 3)
    expected = cuda_args()
    assert opened[6] == 3  # opened on the importer's own GPU
    assert opened[:6] + opened[7:] == expected[:6] + expected[7:]

    for bad in (
        {**shared, "runtime": "torch 0.1"},
        {**shared, "format": 2},
        {**shared, "counter": base64.b64encode(b"../../etc/passwd").decode()},
        {**shared, "dtype": "int64"},
        {**shared, "storage": "os.system"},
        {**shared, "offset": -1},
        {**shared, "shape": [2, 2]},
        {**shared, "handle": "not base64!"},
        {key: value for key, value in shared.items() if key != "event"},
    ):
        with pytest.raises(DeviceShareError):
            decode_handle(bad, 0)

    peer = SharePeer(RUNTIME, ("GPU-a", "GPU-b"))
    assert SharePeer.from_json(json.loads(json.dumps(peer.to_json()))) == peer
    for bad_peer in (None, [], {"runtime": "x"}, {"runtime": "x", "devices": [1]}):
        with pytest.raises(DeviceShareError):
            SharePeer.from_json(bad_peer)
