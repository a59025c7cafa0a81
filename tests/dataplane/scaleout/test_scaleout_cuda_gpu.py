"""Weights into a new instance on a GPU, never from disk (run on the GPU machine: `pytest -m gpu`):
from a running FlowServe instance through CUDA IPC, opened in place or copied device-to-device,
and from the DRAM cache in one upload by every method (an entry registered ahead, as a warm pod
does, by its own mapping with no registration on the path). Each engine's greedy tokens equal
those of an engine that read the folder, and its weights are bitwise the same."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dataplane.agent.process import child_env, free_port
from dataplane.flowserve import device_upload, registered_cache
from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.engine import Engine
from dataplane.flowserve.sampling_params import SamplingParams
from dataplane.flowserve.weights_cache import open_cached, ready_weights
from dataplane.scaleout.dram_cache import DramCache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = [[1, 2, 3, 4, 5], [7, 7, 7], list(range(10, 40))]
CUDA = torch.device("cuda")


def config(model: Path, **options: object) -> EngineConfig:
    base: dict[str, object] = {
        "device": "cuda",
        "dtype": "bfloat16",
        "enforce_eager": True,
        "max_num_seqs": 4,
        "max_model_len": 256,
        "kv_cache_bytes": 16 << 20,
    }
    return EngineConfig(str(model), **{**base, **options})  # type: ignore[arg-type]


def greedy(engine: Engine, n: int = 16) -> list[list[int]]:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    while engine.has_unfinished():
        for step in engine.step():
            if step.new_token_id is not None:
                out[step.request_id].append(step.new_token_id)
    return [out[str(i)] for i in range(len(PROMPTS))]


def same_weights(a: Engine, b: Engine) -> bool:
    wa, wb = a.weight_tensors(), b.weight_tensors()
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def from_disk(tiny_dir: Path) -> tuple[Engine, list[list[int]]]:
    engine = Engine(config(tiny_dir))
    assert engine.weights.source == "disk"
    return engine, greedy(engine)


@pytest.fixture(scope="module")
def exporter(tiny_dir: Path) -> Iterator[str]:
    """A FlowServe instance on the GPU serving its weights on a socket."""
    folder = Path(tempfile.mkdtemp(prefix="df-share-", dir="/tmp"))
    sock = str(folder / "w.sock")
    log = folder / "instance.log"
    argv = [
        sys.executable, "-m", "dataplane.flowserve", "--model", str(tiny_dir),
        "--port", str(free_port()), "--device", "cuda", "--dtype", "bfloat16",
        "--enforce-eager", "--kv-cache-memory", str(16 << 20), "--max-model-len", "256",
        "--share-weights", sock,
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=child_env(os.environ)
        )
    try:
        deadline = time.monotonic() + 180
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the exporting instance did not come up: {log.read_text()[-3000:]}")
            time.sleep(0.05)
        yield sock
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert not os.path.exists(sock), "the socket outlived its instance"


@pytest.mark.parametrize(("mode", "source"), [("share", "cuda_ipc"), ("copy", "device_copy")])
def test_weights_from_a_running_instance_give_the_disk_tokens(
    tiny_dir: Path,
    exporter: str,
    from_disk: tuple[Engine, list[list[int]]],
    mode: str,
    source: str,
) -> None:
    disk, expected = from_disk
    engine = Engine(config(tiny_dir, weights_peer=exporter, weights_peer_mode=mode))
    assert engine.weights.source == source
    assert same_weights(engine, disk)
    assert greedy(engine) == expected
    if mode == "copy":  # one buffer of its own: it can seed the next instance in turn
        storages = {t.untyped_storage().data_ptr() for t in engine.weight_tensors().values()}
        assert len(storages) == 1


def test_a_peer_of_another_dtype_is_passed_over(tiny_dir: Path, exporter: str) -> None:
    engine = Engine(config(tiny_dir, dtype="float32", weights_peer=exporter))
    assert engine.weights.source == "disk"


@pytest.fixture(scope="module")
def cache_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gpu-cache")
    DramCache(root).preload(tiny_dir, "bfloat16")
    return root


@pytest.mark.parametrize("method", ["staged", "staged-threads", "register", "pageable"])
def test_every_upload_method_moves_the_bytes_exactly(
    tiny_dir: Path, cache_dir: Path, method: str
) -> None:
    mapped = open_cached(cache_dir, tiny_dir, torch.bfloat16)
    assert mapped is not None
    ring = None
    if method.startswith("staged"):
        # Many laps of the ring; with threads, every chunk filled in slices (of odd sizes).
        threads = 3 if method == "staged-threads" else 1
        ring = device_upload.StagingRing(3 * 4096 + 7, 3, threads, min_split_bytes=0)
        method = "staged"
    try:
        up = device_upload.upload(mapped.tensors, CUDA, method, ring)  # type: ignore[arg-type]
    except device_upload.UploadError as exc:
        assert method == "register"
        pytest.skip(f"this driver refuses read-only registration: {exc}")
    assert up.method == method
    assert up.nbytes == mapped.nbytes
    for name, host in mapped.tensors.items():
        assert torch.equal(up.tensors[name].cpu(), host), name


def test_weights_from_the_dram_cache_give_the_disk_tokens(
    tiny_dir: Path, cache_dir: Path, from_disk: tuple[Engine, list[list[int]]]
) -> None:
    disk, expected = from_disk
    engine = Engine(config(tiny_dir, weights_cache=str(cache_dir)))
    assert engine.weights.source == "dram_cache"
    assert same_weights(engine, disk)
    assert greedy(engine) == expected


@pytest.fixture
def registered(cache_dir: Path) -> Iterator[registered_cache.Registration]:
    """The cache's entry registered ahead, as a warm pod registers it; released afterwards."""
    registered_cache.release()
    try:
        added = registered_cache.register_entries(cache_dir, None)
        if not added:
            pytest.skip("this driver refuses read-only registration (see the log)")
        (registration,) = added  # the cache holds the one entry
        yield registration
    finally:
        registered_cache.release()


def test_an_entry_registered_ahead_goes_in_one_dma_exactly(
    tiny_dir: Path, cache_dir: Path, registered: registered_cache.Registration
) -> None:
    mapped = open_cached(cache_dir, tiny_dir, torch.bfloat16)
    assert mapped is not None
    assert next(iter(mapped.tensors.values())).untyped_storage().data_ptr() == registered.ptr
    up = device_upload.upload(mapped.tensors, CUDA)  # the default, for a registered region
    assert up.method == "registered"
    assert up.register_seconds == 0.0
    assert up.nbytes == mapped.nbytes == registered.nbytes
    for name, host in mapped.tensors.items():
        assert torch.equal(up.tensors[name].cpu(), host), name


def test_an_override_still_picks_the_method(
    tiny_dir: Path,
    cache_dir: Path,
    registered: registered_cache.Registration,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(device_upload.METHOD_ENV, "staged")
    mapped = open_cached(cache_dir, tiny_dir, torch.bfloat16)
    assert mapped is not None
    up = device_upload.upload(mapped.tensors, CUDA)
    assert up.method == "staged"
    for name, host in mapped.tensors.items():
        assert torch.equal(up.tensors[name].cpu(), host), name


def test_ready_weights_upload_the_entry_registered_ahead(
    tiny_dir: Path,
    cache_dir: Path,
    registered: registered_cache.Registration,
    from_disk: tuple[Engine, list[list[int]]],
) -> None:
    weights = ready_weights(None, cache_dir, tiny_dir, torch.bfloat16, device=CUDA)
    assert weights.source == "dram_cache" and weights.upload_method == "registered"
    assert weights.mapped is not None and weights.tensors is not None
    host = weights.mapped.tensors
    assert next(iter(host.values())).untyped_storage().data_ptr() == registered.ptr
    for name, tensor in weights.tensors.items():
        assert tensor.device.type == "cuda"
        assert torch.equal(tensor.cpu(), host[name]), name
    # Its own entry stays registered: the next engine of this process takes the same path.
    assert registered_cache.REGISTRY.entries() == [registered.entry]
    disk, expected = from_disk
    engine = Engine(config(tiny_dir, weights_cache=str(cache_dir)))
    assert engine.weights.upload_method == "registered"
    assert same_weights(engine, disk)
    assert greedy(engine) == expected
