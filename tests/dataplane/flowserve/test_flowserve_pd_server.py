"""PD disaggregation through real instance servers (uvicorn on loopback, in this process): a
prefill instance exports, a decode instance imports over either transport, and the text equals
a colocated /generate's; mismatched and missing transfers are 409s; unfetched transfers expire.
cuda_ipc: on the host a same-node hand-off stays the shm file and a cuda_ipc handle is a 409
kv_transfer_failed; its protocol runs end to end with a stand-in for the platform's device
share (FakeShare)."""

from __future__ import annotations

import contextlib
import gc
import json
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from test_flowserve_pd_transfer import FakeShare

from controlplane.wire import GenerateDelta, GenerateDone, GenerateError, InstanceRole, KVHandle
from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.device_share import RUNTIME, SharePeer
from dataplane.flowserve.engine import Engine
from dataplane.flowserve.kv_transfer import KVStore, KVTransferConfig
from dataplane.flowserve.platform import Platform
from dataplane.flowserve.server import create_app

GREEDY = {"temperature": 0.0, "max_tokens": 16, "ignore_eos": True}


class Instance:
    """One instance server on a free loopback port, in a thread of this process."""

    def __init__(
        self, model_dir: Path, role: InstanceRole, kv: KVTransferConfig, **engine: Any
    ) -> None:
        self.engine = Engine(EngineConfig(str(model_dir), max_num_seqs=4, **engine))
        self.app = create_app(lambda: self.engine, model_name="tiny", role=role, kv_transfer=kv)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    @property
    def kv_store(self) -> KVStore:
        store: KVStore = self.app.state.instance.kv_store
        return store

    def __enter__(self) -> Instance:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the instance did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()

    def post(self, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(self.url + "/generate", json=body, timeout=30)

    def generate(self, body: dict[str, Any]) -> tuple[list[GenerateDelta], GenerateDone]:
        response = self.post(body)
        assert response.status_code == 200, response.text
        lines = [json.loads(line) for line in response.text.splitlines()]
        assert lines[-1]["type"] == "done", lines[-1]
        deltas = [GenerateDelta.model_validate(line) for line in lines[:-1]]
        return deltas, GenerateDone.model_validate(lines[-1])

    def prefill(self, body: dict[str, Any], transport: str) -> KVHandle:
        deltas, done = self.generate({**body, "prefill_only": {"transport": transport}})
        assert deltas == []  # a prefill streams no text: the decode instance does
        assert done.completion_tokens == 1 and done.kv is not None and done.kv_import is None
        return done.kv

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        lines = [line for line in text.splitlines() if line.startswith(name)]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def text_of(deltas: list[GenerateDelta]) -> str:
    return "".join(d.text for d in deltas)


@pytest.fixture(scope="module")
def shm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kv")


@pytest.fixture(scope="module")
def pair(tiny_model_dir: Path, shm_dir: Path) -> Iterator[tuple[Instance, Instance]]:
    """A prefill instance (block size 4, 8 tokens a step: chunked prompts) and a decode one."""
    kv = KVTransferConfig(shm_dir, fetch_timeout_s=10.0)
    prefill = Instance(tiny_model_dir, "prefill", kv, block_size=4, max_num_batched_tokens=8)
    decode = Instance(tiny_model_dir, "decode", kv)
    with prefill, decode:
        yield prefill, decode


BODIES: list[dict[str, Any]] = [
    {"prompt": "The quick brown fox"},
    {"messages": [{"role": "user", "content": "Name three colours, then a fourth one."}]},
    {"prompt_token_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]},
]


@pytest.mark.parametrize("transport", ["shm", "stream"])
def test_prefill_then_decode_equals_colocated(
    pair: tuple[Instance, Instance], transport: str, shm_dir: Path
) -> None:
    prefill, decode = pair
    for i, body in enumerate(BODIES):
        body = {**body, "sampling": GREEDY}
        colocated, colocated_done = prefill.generate({**body, "request_id": f"c-{transport}{i}"})

        handle = prefill.prefill({**body, "request_id": f"p-{transport}{i}"}, transport)
        assert handle.transport == transport
        assert handle.num_tokens == colocated_done.prompt_tokens
        assert handle.first_token_id == colocated[0].token_ids[0]
        assert handle.num_bytes > 0 and handle.export_s >= 0.0
        if transport == "shm":
            assert Path(handle.location) == shm_dir / f"{handle.transfer_id}.kv"
            assert Path(handle.location).stat().st_size == handle.num_bytes
        else:
            assert handle.location == f"{prefill.url}/kv/{handle.transfer_id}"

        body = {**body, "request_id": f"d-{transport}{i}", "kv_source": handle.model_dump()}
        deltas, done = decode.generate(body)
        assert text_of(deltas) == text_of(colocated)
        assert [t for d in deltas for t in d.token_ids] == [
            t for d in colocated for t in d.token_ids
        ]
        assert deltas[-1].finish_reason == "length"
        assert (done.prompt_tokens, done.completion_tokens) == (handle.num_tokens, 16)
        assert done.kv_import is not None
        assert done.kv_import.transport == transport
        assert done.kv_import.num_bytes == handle.num_bytes
        assert done.kv_import.fetch_s >= 0.0 and done.kv_import.import_s >= 0.0

        # Taken once: the file is gone, the stream forgotten.
        if transport == "shm":
            assert not Path(handle.location).exists()  # the store notices at its next sweep
        else:
            assert httpx.get(handle.location).status_code == 404
        again = decode.post({**body, "request_id": f"again-{transport}{i}"})
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "kv_transfer_failed"

    assert prefill.metric(transfers("export", "ok")) >= 3
    assert prefill.metric("flowserve:kv_exported_bytes_total") > 0
    assert decode.metric(transfers("import", "ok")) >= 3
    assert decode.metric("flowserve:kv_imported_bytes_total") > 0
    assert decode.metric(transfers("import", "failed")) >= 3


def transfers(direction: str, outcome: str) -> str:
    labels = f'direction="{direction}",model_name="tiny",outcome="{outcome}"'
    return f"flowserve:kv_transfers_total{{{labels}}}"


def test_max_tokens_one_ends_at_the_imported_token(pair: tuple[Instance, Instance]) -> None:
    prefill, decode = pair
    body = {"prompt": "Hello there", "sampling": {**GREEDY, "max_tokens": 1}}
    handle = prefill.prefill({**body, "request_id": "one-p"}, "stream")
    deltas, done = decode.generate(
        {**body, "request_id": "one-d", "kv_source": handle.model_dump()}
    )
    assert [t for d in deltas for t in d.token_ids] == [handle.first_token_id]
    assert deltas[-1].finish_reason == "length" and done.completion_tokens == 1


def test_kv_mismatch(pair: tuple[Instance, Instance], shm_dir: Path) -> None:
    prefill, decode = pair
    body = {"prompt_token_ids": [1, 2, 3, 4, 5, 6], "sampling": GREEDY}
    handle = prefill.prefill({**body, "request_id": "m-p"}, "shm")

    longer = {"prompt_token_ids": [1, 2, 3, 4, 5, 6, 7], "sampling": GREEDY}
    response = decode.post({**longer, "request_id": "m-d", "kv_source": handle.model_dump()})
    assert response.status_code == 409
    error = response.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (
        "kv_mismatch",
        "kv_source",
        "invalid_request_error",
    )
    assert not Path(handle.location).exists()  # a transfer nobody can use is dropped

    # Same length, other tokens: the transfer names its prompt.
    handle = prefill.prefill({**body, "request_id": "m-p2"}, "stream")
    other = {"prompt_token_ids": [1, 2, 3, 4, 5, 9], "sampling": GREEDY}
    response = decode.post({**other, "request_id": "m-d2", "kv_source": handle.model_dump()})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "kv_mismatch"

    # The first token's logprob stayed on the prefill instance: such a request computes here.
    handle = prefill.prefill({**body, "request_id": "m-p3"}, "stream")
    wants = {**body, "sampling": {**GREEDY, "logprobs": True}}
    response = decode.post({**wants, "request_id": "m-d3", "kv_source": handle.model_dump()})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "kv_mismatch"
    assert httpx.get(handle.location).status_code == 404  # dropped on the prefill instance too


def test_missing_transfers(pair: tuple[Instance, Instance], shm_dir: Path) -> None:
    prefill, decode = pair
    body = {"prompt": "Hello", "sampling": GREEDY}
    handle = prefill.prefill({**body, "request_id": "x-p"}, "stream")
    gone = [
        handle.model_copy(update={"transfer_id": "nope", "location": f"{prefill.url}/kv/nope"}),
        handle.model_copy(
            update={"transfer_id": "nope", "transport": "shm", "location": str(shm_dir / "nope.kv")}
        ),
        handle.model_copy(update={"transport": "shm", "location": "/etc/hostname"}),
    ]
    for i, missing in enumerate(gone):
        response = decode.post({**body, "request_id": f"x-d{i}", "kv_source": missing.model_dump()})
        assert response.status_code == 409, response.text
        assert response.json()["error"]["code"] == "kv_transfer_failed"
    assert Path("/etc/hostname").exists()

    # DELETE drops a transfer; a later fetch fails.
    deleted = httpx.delete(handle.location).json()
    assert deleted == {"transfer_id": handle.transfer_id, "deleted": True}
    assert httpx.get(handle.location).status_code == 404
    response = decode.post({**body, "request_id": "x-d9", "kv_source": handle.model_dump()})
    assert response.json()["error"]["code"] == "kv_transfer_failed"


def test_unfetched_transfers_expire(tiny_model_dir: Path, tmp_path: Path) -> None:
    kv = KVTransferConfig(tmp_path, ttl_s=0.4)
    with Instance(tiny_model_dir, "prefill", kv) as prefill:
        body = {"prompt": "Hello", "sampling": GREEDY}
        on_shm = prefill.prefill({**body, "request_id": "e1"}, "shm")
        on_stream = prefill.prefill({**body, "request_id": "e2"}, "stream")
        assert Path(on_shm.location).exists() and prefill.kv_store.num_transfers == 2
        deadline = time.monotonic() + 5
        while prefill.kv_store.num_transfers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert prefill.kv_store.num_transfers == 0 and prefill.kv_store.num_bytes == 0
        assert list(tmp_path.iterdir()) == []
        assert httpx.get(on_stream.location).status_code == 404
        assert prefill.metric(transfers("export", "expired")) == 2


def test_a_full_store_fails_the_prefill(tiny_model_dir: Path, tmp_path: Path) -> None:
    kv = KVTransferConfig(tmp_path, max_bytes=1000)
    with Instance(tiny_model_dir, "prefill", kv) as prefill:
        body = {"prompt": "Hello", "sampling": GREEDY, "request_id": "full"}
        response = prefill.post({**body, "prefill_only": {"transport": "stream"}})
        assert response.status_code == 200
        (line,) = response.text.splitlines()
        error = GenerateError.model_validate_json(line)
        assert error.code == "kv_export_failed" and "cap" in error.message
        assert prefill.engine.block_manager.num_free_blocks == prefill.engine.num_kv_blocks


# --- cuda_ipc ----------------------------------------------------------------------------------


def test_the_host_hands_over_same_node_kv_by_shm(pair: tuple[Instance, Instance]) -> None:
    """A CPU prefill instance shares no device memory: a same-node hand-off is the shm file as
    ever, whichever of the two the control plane asks for."""
    prefill, decode = pair
    body = {"prompt": "Hello there", "sampling": GREEDY}
    for i, asked in enumerate(("shm", "cuda_ipc")):
        handle = prefill.prefill({**body, "request_id": f"h-p{i}"}, asked)
        assert handle.transport == "shm" and Path(handle.location).exists()
        deltas, done = decode.generate(
            {**body, "request_id": f"h-d{i}", "kv_source": handle.model_dump()}
        )
        assert done.kv_import is not None and done.kv_import.transport == "shm"


def test_a_cuda_ipc_handle_reaching_a_cpu_instance_fails_the_transfer(
    pair: tuple[Instance, Instance],
) -> None:
    prefill, decode = pair
    body = {"prompt": "Hello there", "sampling": GREEDY}
    held = prefill.prefill({**body, "request_id": "ipc-p"}, "stream")
    handle = held.model_copy(update={"transport": "cuda_ipc"})
    response = decode.post({**body, "request_id": "ipc-d", "kv_source": handle.model_dump()})
    assert response.status_code == 409
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("kv_transfer_failed", "kv_source")
    assert "cannot map another process's device memory" in error["message"]
    # It asked for no handle, and dropped the transfer: the prefill instance holds nothing.
    assert httpx.get(held.location).status_code == 404
    assert decode.metric(transfers("import", "failed")) >= 1


@contextlib.contextmanager
def sharing(share: FakeShare, *instances: Instance) -> Iterator[None]:
    """`instances` started on a host platform that shares memory as a GPU's does (a stand-in
    for CUDA IPC, which test_flowserve_pd_ipc_gpu covers), serving until the block ends."""
    with contextlib.ExitStack() as stack:
        with pytest.MonkeyPatch.context() as patch:  # read once, as each instance starts
            patch.setattr(Platform, "device_share", lambda self: share)
            for instance in instances:
                stack.enter_context(instance)
        yield


@pytest.fixture(scope="module")
def ipc_pair(tiny_model_dir: Path, shm_dir: Path) -> Iterator[tuple[Instance, Instance, FakeShare]]:
    share = FakeShare()
    kv = KVTransferConfig(shm_dir, fetch_timeout_s=10.0)
    prefill = Instance(tiny_model_dir, "prefill", kv, block_size=4, max_num_batched_tokens=8)
    decode = Instance(tiny_model_dir, "decode", kv)
    with sharing(share, prefill, decode):
        yield prefill, decode, share


def test_cuda_ipc_hand_off_equals_colocated(
    ipc_pair: tuple[Instance, Instance, FakeShare],
) -> None:
    prefill, decode, share = ipc_pair
    for i, body in enumerate(BODIES):
        body = {**body, "sampling": GREEDY}
        colocated, _ = prefill.generate({**body, "request_id": f"ic-{i}"})

        handle = prefill.prefill({**body, "request_id": f"ip-{i}"}, "shm")
        assert handle.transport == "cuda_ipc"
        assert handle.location == f"{prefill.url}/kv/{handle.transfer_id}"
        assert prefill.kv_store.device_bytes == handle.num_bytes > 0

        body = {**body, "request_id": f"id-{i}", "kv_source": handle.model_dump()}
        deltas, done = decode.generate(body)
        assert [t for d in deltas for t in d.token_ids] == [
            t for d in colocated for t in d.token_ids
        ]
        assert text_of(deltas) == text_of(colocated)
        assert done.kv_import is not None
        assert (done.kv_import.transport, done.kv_import.num_bytes) == (
            "cuda_ipc",
            handle.num_bytes,
        )
        # Copied, then deleted on the prefill instance: its buffer is gone.
        assert prefill.kv_store.num_transfers == 0 and prefill.kv_store.device_bytes == 0
        assert share.shared == {}
        again = decode.post({**body, "request_id": f"iagain-{i}"})
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "kv_transfer_failed"

    # Across nodes the K/V still go by stream.
    handle = prefill.prefill({**BODIES[0], "sampling": GREEDY, "request_id": "is"}, "stream")
    assert handle.transport == "stream" and prefill.kv_store.device_bytes == 0
    assert httpx.delete(handle.location).json()["deleted"]


def test_a_share_goes_only_to_a_peer_that_can_open_it(
    ipc_pair: tuple[Instance, Instance, FakeShare],
) -> None:
    prefill, _, share = ipc_pair
    body = {"prompt": "Hello", "sampling": GREEDY}
    handle = prefill.prefill({**body, "request_id": "r-p"}, "shm")
    url = f"{handle.location}/share"
    assert httpx.post(url, content=b"{").status_code == 400
    assert prefill.kv_store.num_transfers == 1  # a bad request takes nothing

    other_gpu = SharePeer(RUNTIME, ("GPU-elsewhere",)).to_json()
    response = httpx.post(url, json={"peer": other_gpu})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "kv_share_refused"
    assert "cannot map" in response.json()["error"]["message"]
    assert prefill.kv_store.num_transfers == 0 and share.shared == {}  # dropped, not shared

    handle = prefill.prefill({**body, "request_id": "r-p2"}, "shm")
    url = f"{handle.location}/share"
    first = httpx.post(url, json={"peer": share.peer().to_json()})
    assert first.status_code == 200 and first.json()["first_token_id"] == handle.first_token_id
    assert httpx.post(url, json={"peer": share.peer().to_json()}).status_code == 404  # once
    assert httpx.get(handle.location).status_code == 404  # nor through the host
    assert httpx.delete(handle.location).json()["deleted"]
    assert prefill.kv_store.device_bytes == 0
    share.shared.clear()


def test_unfetched_cuda_ipc_transfers_expire(tiny_model_dir: Path, tmp_path: Path) -> None:
    share = FakeShare()
    prefill = Instance(tiny_model_dir, "prefill", KVTransferConfig(tmp_path, ttl_s=0.4))
    with sharing(share, prefill):
        body = {"prompt": "Hello", "sampling": GREEDY}
        handle = prefill.prefill({**body, "request_id": "ie"}, "shm")
        assert handle.transport == "cuda_ipc" and prefill.kv_store.device_bytes > 0
        kv = weakref.ref(prefill.kv_store._held[handle.transfer_id].kv.kv)  # type: ignore[union-attr]
        deadline = time.monotonic() + 5
        while prefill.kv_store.num_transfers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert prefill.kv_store.num_transfers == 0 and prefill.kv_store.device_bytes == 0
        # Nothing else holds the expired K/V (on a GPU: their device memory is freed).
        gc.collect()
        assert kv() is None, [type(r).__name__ for r in gc.get_referrers(kv())]
        assert prefill.metric(transfers("export", "expired")) == 1
        shared = httpx.post(f"{handle.location}/share", json={"peer": share.peer().to_json()})
        assert shared.status_code == 404


def test_past_the_device_cap_kv_go_by_shm(tiny_model_dir: Path, tmp_path: Path) -> None:
    share = FakeShare()
    kv = KVTransferConfig(tmp_path, max_device_bytes=1)
    prefill = Instance(tiny_model_dir, "prefill", kv)
    decode = Instance(tiny_model_dir, "decode", kv)
    with sharing(share, prefill, decode):
        body = {"prompt": "Hello there", "sampling": GREEDY}
        colocated, _ = prefill.generate({**body, "request_id": "cap-c"})
        handle = prefill.prefill({**body, "request_id": "cap-p"}, "shm")
        assert handle.transport == "shm" and Path(handle.location).exists()
        deltas, done = decode.generate(
            {**body, "request_id": "cap-d", "kv_source": handle.model_dump()}
        )
        assert text_of(deltas) == text_of(colocated)
        assert done.kv_import is not None and done.kv_import.transport == "shm"
