"""The cuda_ipc K/V hand-off on a CUDA device (run on the GPU machine: `pytest -m gpu`): CUDA IPC
handles made in one process and opened in another (copied to the device or to pinned host
memory, released when not opened); an engine's export left on the device imports as the host
one does; and a prefill instance (this process) hands its K/V to a decode instance (a child
process on the same GPU) by cuda_ipc, with greedy output equal to a colocated engine's in bf16
and float32, the bytes reported, and the prefill's device buffer freed once copied, once
expired, or when refused to a peer that cannot map it."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from test_flowserve_correctness import PROMPTS, ids_of
from test_flowserve_engine import run, tokens
from test_flowserve_pd_engine import colocated, greedy
from test_flowserve_pd_server import GREEDY, Instance, transfers

from dataplane.agent.process import child_env, free_port
from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.device_share import RUNTIME, CudaIpc, DeviceShareError, SharePeer
from dataplane.flowserve.engine import Engine
from dataplane.flowserve.kv_transfer import KVTransferConfig
from dataplane.flowserve.prompt_kv import PromptKV

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

KV_CACHE_BYTES = 32 << 20
# Every engine alike and fed one prompt at a time, so that each step's shapes match and even
# bf16 rounds the same on the decode instance as on the colocated engine.
OPTIONS: dict[str, Any] = {
    "device": "cuda",
    "max_num_seqs": 4,
    "block_size": 4,
    "max_num_batched_tokens": 32,
    "kv_cache_bytes": KV_CACHE_BYTES,
}
FLAGS = [
    "--device", "cuda", "--max-num-seqs", "4", "--block-size", "4",
    "--max-num-batched-tokens", "32", "--kv-cache-memory", str(KV_CACHE_BYTES),
]  # fmt: skip


# --- CUDA IPC handles across processes -------------------------------------------------------

EXPORTER = """
import json, sys, torch
from dataplane.flowserve.device_share import CudaIpc, SharePeer
share = CudaIpc(torch.device("cuda"))
peer = SharePeer.from_json(json.loads(sys.stdin.readline()))
tensor = torch.arange(2 * 2 * 5 * 3 * 8, device="cuda").to(torch.bfloat16).reshape(2, 2, 5, 3, 8)
before = torch.cuda.memory_allocated()
print(json.dumps([share.share(tensor, peer) for _ in range(3)]), flush=True)
sys.stdin.readline()  # the importer is done with the three handles
del tensor
torch.cuda.ipc_collect()
print(json.dumps({"freed": before - torch.cuda.memory_allocated()}), flush=True)
"""


def test_cuda_ipc_handles_open_in_another_process_and_free_the_exporters_memory() -> None:
    share = CudaIpc(torch.device("cuda"))
    expected = torch.arange(2 * 2 * 5 * 3 * 8).to(torch.bfloat16).reshape(2, 2, 5, 3, 8)
    num_bytes = expected.numel() * expected.element_size()
    exporter = subprocess.Popen(
        [sys.executable, "-c", EXPORTER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_env(os.environ),
        text=True,
    )
    assert exporter.stdin is not None and exporter.stdout is not None
    try:
        exporter.stdin.write(json.dumps(share.peer().to_json()) + "\n")
        exporter.stdin.flush()
        on_device, on_host, unopened = json.loads(exporter.stdout.readline())

        copy = share.take(on_device, num_bytes=num_bytes, to_host=False)
        assert copy.device.type == "cuda" and torch.equal(copy.cpu(), expected)
        host = share.take(on_host, num_bytes=num_bytes, to_host=True)
        assert host.device.type == "cpu" and host.is_pinned() and torch.equal(host, expected)
        with pytest.raises(DeviceShareError, match="bytes were expected"):
            share.take(unopened, num_bytes=num_bytes + 2, to_host=False)  # released unopened

        exporter.stdin.write("done\n")
        exporter.stdin.flush()
        freed = json.loads(exporter.stdout.readline())["freed"]
        assert freed >= num_bytes  # every handle opened or released: nothing left in limbo
        assert torch.equal(copy.cpu(), expected)  # a copy of its own, after the exporter's free
    finally:
        exporter.stdin.close()
        exporter.wait(30)


def test_a_peer_that_cannot_map_the_gpu_gets_no_handle() -> None:
    share = CudaIpc(torch.device("cuda"))
    tensor = torch.zeros(4, device="cuda", dtype=torch.bfloat16)
    for peer in (
        SharePeer(RUNTIME, ("GPU-elsewhere",)),
        SharePeer("torch 0.0", share.peer().devices),
    ):
        with pytest.raises(DeviceShareError):
            share.share(tensor, peer)


# --- the engine: an export left on the device -------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_export_left_on_the_device_imports_as_the_host_one(
    tiny_model_dir: Path, dtype: str
) -> None:
    """Two prefill engines fed alike, one exporting to the host and one leaving the K/V on the
    device: the same bytes; imported from the device, the colocated engine's tokens."""
    engines = [Engine(EngineConfig(str(tiny_model_dir), dtype=dtype, **OPTIONS)) for _ in range(4)]
    p_host, p_device, d, c = engines
    params = greedy(16)
    for i, text in enumerate(PROMPTS):
        prompt = ids_of(c, text)
        (expected,) = colocated(c, [prompt], params)
        p_host.add_request(f"h{i}", prompt, params, prefill_only=True)
        p_device.add_request(f"g{i}", prompt, params, prefill_only=True, export_on_device=True)
        on_host, on_device = run(p_host)[f"h{i}"][0].kv, run(p_device)[f"g{i}"][0].kv
        assert isinstance(on_host, PromptKV) and isinstance(on_device, PromptKV)
        assert on_host.kv.device.type == "cpu" and on_device.kv.is_cuda
        assert torch.equal(on_device.kv.cpu(), on_host.kv)
        # As the decode instance holds it: a copy of its own on a stream of its own.
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            imported = on_device.kv.clone()
        stream.synchronize()
        kv = PromptKV(imported, on_device.first_token_id, on_device.prompt_digest)
        d.add_request(f"d{i}", prompt, params, imported=kv)
        del kv, imported
        assert tokens(run(d)[f"d{i}"]) == expected


# --- a prefill instance here, a decode instance in a child process ----------------------------


@pytest.fixture(scope="module")
def kv_dir() -> Path:
    return Path(
        tempfile.mkdtemp(prefix="df-kv-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    )


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def decode_instance(
    tiny_model_dir: Path, kv_dir: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[str, str]]:
    """(its URL, its dtype): a FlowServe decode instance on this GPU, in a process of its own."""
    dtype: str = request.param
    port = free_port()
    log = kv_dir / f"decode-{dtype}.log"
    argv = [
        sys.executable, "-m", "dataplane.flowserve", "--model", str(tiny_model_dir),
        "--port", str(port), "--role", "decode", "--dtype", dtype, "--kv-dir", str(kv_dir),
        *FLAGS,
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=child_env(os.environ)
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the decode instance did not come up: {log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).json().get("status") == "ok":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url, dtype
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def generate(url: str, body: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
    response = httpx.post(f"{url}/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines[-1]["type"] == "done", lines[-1]
    return [t for line in lines[:-1] for t in line["token_ids"]], lines[-1]


def kv_bytes(engine: Engine, num_tokens: int) -> int:
    layout = engine.kv_layout
    itemsize = torch.empty((), dtype=layout.dtype).element_size()
    return layout.num_layers * 2 * num_tokens * layout.num_kv_heads * layout.head_dim * itemsize


def freed(before: int, num_bytes: int, timeout_s: float = 5.0) -> bool:
    """This process's device memory fell by `num_bytes` from `before` (within the timeout)."""
    deadline = time.monotonic() + timeout_s
    # Garbage (reference cycles) is not a live reference: collect it before reading.
    while gc.collect() >= 0 and torch.cuda.memory_allocated() > before - num_bytes:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_cuda_ipc_hand_off_equals_colocated_and_frees_the_prefills_buffer(
    tiny_model_dir: Path, kv_dir: Path, decode_instance: tuple[str, str]
) -> None:
    decode_url, dtype = decode_instance
    c = Engine(EngineConfig(str(tiny_model_dir), dtype=dtype, **OPTIONS))
    prefill = Instance(
        tiny_model_dir,
        "prefill",
        KVTransferConfig(kv_dir),
        dtype=dtype,
        **{k: v for k, v in OPTIONS.items() if k != "max_num_seqs"},
    )
    with prefill:
        for i, text in enumerate(PROMPTS):
            prompt = ids_of(c, text)
            (expected,) = colocated(c, [prompt], greedy(16))
            body = {"prompt_token_ids": prompt, "sampling": GREEDY}

            handle = prefill.prefill({**body, "request_id": f"p{dtype}{i}"}, "shm")
            assert handle.transport == "cuda_ipc"
            assert handle.location == f"{prefill.url}/kv/{handle.transfer_id}"
            assert handle.num_bytes == kv_bytes(c, len(prompt)) == prefill.kv_store.device_bytes
            assert list(kv_dir.glob("*.kv")) == []  # nothing through the host
            held = torch.cuda.memory_allocated()

            kv_source = handle.model_dump()
            got, done = generate(
                decode_url, {**body, "request_id": f"d{dtype}{i}", "kv_source": kv_source}
            )
            assert got == expected
            kv_import = done["kv_import"]
            assert kv_import["transport"] == "cuda_ipc"
            assert kv_import["num_bytes"] == handle.num_bytes
            assert kv_import["fetch_s"] > 0 and kv_import["import_s"] >= 0

            # Copied, then deleted: the prefill instance no longer holds the buffer.
            assert prefill.kv_store.num_transfers == 0 and prefill.kv_store.device_bytes == 0
            assert freed(held, handle.num_bytes)
            again = httpx.post(
                f"{decode_url}/generate",
                json={**body, "request_id": f"a{dtype}{i}", "kv_source": kv_source},
                timeout=60,
            )
            assert again.status_code == 409
            assert again.json()["error"]["code"] == "kv_transfer_failed"
        assert prefill.metric(transfers("export", "ok")) == len(PROMPTS)


def test_unfetched_or_refused_cuda_ipc_kv_are_freed(
    tiny_model_dir: Path, kv_dir: Path, decode_instance: tuple[str, str]
) -> None:
    decode_url, dtype = decode_instance
    config = KVTransferConfig(kv_dir, ttl_s=2.0)
    options = {k: v for k, v in OPTIONS.items() if k != "max_num_seqs"}
    with Instance(
        tiny_model_dir, "prefill", config, dtype=dtype, enforce_eager=True, **options
    ) as prefill:
        body = {"prompt": "The quick brown fox", "sampling": GREEDY}
        handle = prefill.prefill({**body, "request_id": "late"}, "shm")
        held = torch.cuda.memory_allocated()
        assert handle.transport == "cuda_ipc"
        assert prefill.kv_store.device_bytes == handle.num_bytes  # still held when measured
        assert freed(held, handle.num_bytes, timeout_s=10.0)  # its TTL passed
        assert prefill.kv_store.num_transfers == 0
        assert prefill.metric(transfers("export", "expired")) == 1
        late = httpx.post(
            f"{decode_url}/generate",
            json={**body, "request_id": "late-d", "kv_source": handle.model_dump()},
            timeout=60,
        )
        assert late.status_code == 409 and late.json()["error"]["code"] == "kv_transfer_failed"

        handle = prefill.prefill({**body, "request_id": "refused"}, "shm")
        held = torch.cuda.memory_allocated()
        elsewhere = SharePeer(RUNTIME, ("GPU-on-another-node",)).to_json()
        refused = httpx.post(f"{handle.location}/share", json={"peer": elsewhere})
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "kv_share_refused"
        assert prefill.kv_store.num_transfers == 0
        assert freed(held, handle.num_bytes)


def test_past_the_device_cap_the_hand_off_goes_by_shm(
    tiny_model_dir: Path, kv_dir: Path, decode_instance: tuple[str, str]
) -> None:
    decode_url, dtype = decode_instance
    c = Engine(EngineConfig(str(tiny_model_dir), dtype=dtype, **OPTIONS))
    config = KVTransferConfig(kv_dir, max_device_bytes=1)
    options = {k: v for k, v in OPTIONS.items() if k != "max_num_seqs"}
    with Instance(tiny_model_dir, "prefill", config, dtype=dtype, **options) as prefill:
        prompt = ids_of(c, PROMPTS[0])
        (expected,) = colocated(c, [prompt], greedy(16))
        body = {"prompt_token_ids": prompt, "sampling": GREEDY}
        handle = prefill.prefill({**body, "request_id": "cap-p"}, "shm")
        assert handle.transport == "shm" and Path(handle.location).exists()
        assert prefill.kv_store.device_bytes == 0
        got, done = generate(
            decode_url, {**body, "request_id": "cap-d", "kv_source": handle.model_dump()}
        )
        assert got == expected and done["kv_import"]["transport"] == "shm"
