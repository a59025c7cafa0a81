"""The CUDA path's parts that need no GPU: the launcher's `ipc` choice (fakes, no processes), the
flags it hands FlowServe, the weight manifest's guard, the copy into one buffer, the upload's
flat-region check, and that a peer is ignored off CUDA. The GPU half: test_scaleout_cuda_gpu."""

from __future__ import annotations

import io
import os
import pickle
import socket
import threading
from pathlib import Path

import pytest
import torch
from test_scaleout_launcher import FakePod, FakePool, fake_handle, start

from dataplane.flowserve.__main__ import engine_config, parse_args
from dataplane.flowserve.device_upload import UploadError, flat_region
from dataplane.flowserve.weights_cache import open_cached, ready_weights
from dataplane.scaleout import cuda_share
from dataplane.scaleout import launcher as launcher_module
from dataplane.scaleout.dram_cache import DramCache
from dataplane.scaleout.handles import InstanceHandle
from dataplane.scaleout.launcher import Launcher
from dataplane.scaleout.protocol import StartCommand
from dataplane.scaleout.runtime import clock_for


@pytest.fixture
def cold(monkeypatch: pytest.MonkeyPatch) -> list[StartCommand]:
    spawned: list[StartCommand] = []

    def spawn_cold(command: StartCommand) -> InstanceHandle:
        spawned.append(command)
        return fake_handle(command, "cold")

    monkeypatch.setattr(launcher_module, "spawn_cold", spawn_cold)
    return spawned


@pytest.fixture(autouse=True)
def share_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DEEPFLOW_SHARE_DIR", str(tmp_path / "share"))
    return tmp_path / "share"


def exported(command: StartCommand) -> None:
    """What the instance does once its weights are loaded: its socket appears."""
    assert command.share_socket is not None
    Path(command.share_socket).parent.mkdir(parents=True, exist_ok=True)
    Path(command.share_socket).touch()


def test_a_cuda_instance_takes_the_weights_of_a_running_one(
    tmp_path: Path, cold: list[StartCommand]
) -> None:
    launcher = Launcher(log_dir=tmp_path, cache_dir=tmp_path / "cache")
    first = launcher.launch(start(device="cuda"), 9001)
    assert first.path == "cold"
    assert first.fallbacks[1] == "ipc: no instance of this model exports its weights on this node"
    assert launcher.launch(start(device="cuda"), 9002).path == "cold"  # not exporting yet
    exported(cold[0])
    handle = launcher.launch(start(device="cuda"), 9003)
    assert (handle.path, handle.fallbacks[1:]) == ("ipc", [])
    command = cold[-1]
    assert command.weights_peer == cold[0].share_socket
    assert command.weights_cache == str(tmp_path / "cache")  # should the peer go away first
    args = parse_args(command.flowserve_argv())
    config = engine_config(args)
    assert (config.weights_peer, config.weights_peer_mode) == (cold[0].share_socket, "copy")
    assert args.share_weights == command.share_socket != cold[0].share_socket  # seeds others
    assert clock_for(command, "cold", 1.0, 1.0).path == "ipc"


def test_ipc_prefers_a_warm_pod_for_the_process(tmp_path: Path, cold: list[StartCommand]) -> None:
    pod = FakePod()
    launcher = Launcher(log_dir=tmp_path, pool=FakePool([pod]))  # type: ignore[arg-type]
    launcher.launch(start(device="cuda", dtype="bfloat16"), 9001)  # the pod serves this one
    exported(pod.started[0])
    launcher.pool.pods.append(FakePod())  # type: ignore[union-attr]
    handle = launcher.launch(start(device="cuda"), 9002)  # bfloat16 is CUDA's default
    assert handle.path == "ipc" and not cold
    assert launcher.pool.pods == []  # type: ignore[union-attr]


def test_only_a_live_peer_of_the_same_model_and_dtype_is_used(
    tmp_path: Path, cold: list[StartCommand], monkeypatch: pytest.MonkeyPatch
) -> None:
    launcher = Launcher(log_dir=tmp_path)
    first = launcher.launch(start(device="cuda"), 9001)
    exported(cold[0])
    assert launcher.launch(start(device="cuda", dtype="float16"), 9002).path == "cold"
    other = start(device="cuda").model_copy(update={"model_path": "/models/other"})
    assert launcher.launch(other, 9003).path == "cold"
    monkeypatch.setattr(type(first), "poll", lambda self: 0)  # every fake has exited
    assert launcher.peer_for(start(device="cuda")) is None


def test_a_sharing_instance_does_not_export(tmp_path: Path, cold: list[StartCommand]) -> None:
    launcher = Launcher(log_dir=tmp_path, peer_import="share")
    launcher.launch(start(device="cuda"), 9001)
    exported(cold[0])
    handle = launcher.launch(start(device="cuda"), 9002)
    assert handle.path == "ipc"
    assert cold[1].share_socket is None and cold[1].weights_peer_mode == "share"
    os.unlink(cold[0].share_socket)  # type: ignore[arg-type]  # the first one stops exporting
    assert launcher.peer_for(start(device="cuda")) is None  # the sharer is no peer


def test_cpu_instances_neither_export_nor_import(tmp_path: Path, cold: list[StartCommand]) -> None:
    launcher = Launcher(log_dir=tmp_path)
    handle = launcher.launch(start(device="cpu"), 9001)
    assert not any(f.startswith("ipc") for f in handle.fallbacks)
    assert cold[0].share_socket is None
    assert "--share-weights" not in cold[0].flowserve_argv()


class Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.getenv, ("HOME",))


def serve_once(path: str, payload: bytes) -> threading.Thread:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(len(payload).to_bytes(8, "big") + payload)
        server.close()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    return thread


def test_a_manifest_may_name_only_torch(tmp_path: Path) -> None:
    with pytest.raises(pickle.UnpicklingError):
        cuda_share._TorchOnly(io.BytesIO(pickle.dumps(Evil()))).load()
    path = str(tmp_path / "w.sock")
    serve_once(path, pickle.dumps({"format": cuda_share.FORMAT, "tensors": Evil()}))
    with pytest.raises(cuda_share.ShareError, match="no weight manifest"):
        cuda_share.read_manifest(path)


def test_no_peer_is_a_share_error(tmp_path: Path) -> None:
    with pytest.raises(cuda_share.ShareError):
        cuda_share.import_weights(str(tmp_path / "none.sock"), torch.device("cuda"), torch.float32)


def test_a_peer_is_ignored_off_cuda(tiny_dir: Path) -> None:
    weights = ready_weights(
        None, None, tiny_dir, torch.float32, device=torch.device("cpu"), peer="/nonexistent"
    )
    assert weights.source == "disk"


def test_the_copy_is_one_buffer_and_keeps_ties() -> None:
    a, b = torch.randn(3, 5), torch.arange(7, dtype=torch.int64)
    copies, nbytes = cuda_share.copy_into_one_buffer(
        {"a": a, "tied": a, "b": b}, torch.device("cpu")
    )
    assert torch.equal(copies["a"], a) and torch.equal(copies["b"], b)
    assert copies["tied"] is copies["a"]
    assert copies["a"].untyped_storage().data_ptr() == copies["b"].untyped_storage().data_ptr()
    assert nbytes == 2 * cuda_share.ALIGN
    assert (copies["b"].data_ptr() - copies["a"].data_ptr()) % cuda_share.ALIGN == 0


def test_an_entry_is_one_flat_region(tiny_dir: Path, tmp_path: Path) -> None:
    DramCache(tmp_path / "cache").preload(tiny_dir)
    mapped = open_cached(tmp_path / "cache", tiny_dir, torch.float32)
    assert mapped is not None
    region = flat_region(mapped.tensors)
    assert region.host.numel() == mapped.nbytes
    for name, (offset, dtype, shape) in region.views.items():
        size = mapped.tensors[name].numel() * mapped.tensors[name].element_size()
        view = region.host[offset : offset + size].view(dtype).view(shape)
        assert torch.equal(view, mapped.tensors[name])
    with pytest.raises(UploadError):
        flat_region({"a": torch.zeros(2), "b": torch.zeros(2)})
