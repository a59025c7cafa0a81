"""The launcher's choice of path and its fallbacks (fakes, no processes), the startup marks, and
the flags every path hands FlowServe."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from controlplane.wire import InstanceStart
from dataplane.agent.errors import InvalidStart
from dataplane.agent.launch import flowserve_command
from dataplane.flowserve.__main__ import parse_args
from dataplane.flowserve.startup import StartupClock
from dataplane.scaleout import launcher as launcher_module
from dataplane.scaleout.errors import PodUnavailable, ScaleOutError, ZygoteUnavailable
from dataplane.scaleout.fork import Zygote
from dataplane.scaleout.handles import InstanceHandle
from dataplane.scaleout.launcher import Launcher
from dataplane.scaleout.protocol import StartCommand


@dataclass(eq=False)
class FakeHandle(InstanceHandle):
    def poll(self) -> int | None:
        return None

    def _signal(self, sig: signal.Signals) -> None:
        pass


def fake_handle(command: StartCommand, path: str) -> FakeHandle:
    return FakeHandle(
        instance_id=command.instance_id,
        path=path,  # type: ignore[arg-type]
        pid=1,
        url=f"http://{command.host}:{command.port}",
        log_path=command.log_path,
        requested_at=command.requested_at,
        dispatched_at=command.requested_at,
    )


@dataclass
class FakeZygote:
    works: bool = True
    resolved_dtype: str = "float32"
    forked: list[StartCommand] = field(default_factory=list)

    def alive(self) -> bool:
        return True

    def fork(self, command: StartCommand) -> InstanceHandle:
        if not self.works:
            raise ZygoteUnavailable("zygote 7 is gone")
        self.forked.append(command)
        return fake_handle(command, "fork")

    def close(self) -> None:
        pass


@dataclass
class FakePod:
    works: bool = True
    started: list[StartCommand] = field(default_factory=list)

    def start_instance(self, command: StartCommand) -> InstanceHandle:
        if not self.works:
            raise PodUnavailable("warm pod 8 exited")
        self.started.append(command)
        return fake_handle(command, "warm_pod")


@dataclass
class FakePool:
    pods: list[FakePod] = field(default_factory=list)

    def take(self, wait_s: float = 0.0) -> FakePod | None:
        return self.pods.pop(0) if self.pods else None

    def close(self) -> None:
        pass


@pytest.fixture
def cold(monkeypatch: pytest.MonkeyPatch) -> list[StartCommand]:
    spawned: list[StartCommand] = []

    def spawn_cold(command: StartCommand) -> InstanceHandle:
        spawned.append(command)
        return fake_handle(command, "cold")

    monkeypatch.setattr(launcher_module, "spawn_cold", spawn_cold)
    return spawned


def node(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    zygote: FakeZygote | None = None,
    pool: FakePool | None = None,
) -> Launcher:
    launcher = Launcher(log_dir=tmp_path, cache_dir=tmp_path / "cache", pool=pool)  # type: ignore[arg-type]
    if zygote is not None:
        monkeypatch.setattr(Zygote, "start", lambda *a, **k: zygote)
        launcher.start_zygote("/models/m")
    return launcher


def start(**engine_args: object) -> InstanceStart:
    return InstanceStart(
        instance_id="i-1", model="m", model_path="/models/m", engine_args=engine_args
    )


def test_fork_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cold: list[object]) -> None:
    zygote, pod = FakeZygote(), FakePod()
    launcher = node(tmp_path, monkeypatch, zygote, FakePool([pod]))
    handle = launcher.launch(start(), 9001)
    assert (handle.path, handle.fallbacks) == ("fork", [])
    assert len(zygote.forked) == 1 and not pod.started and not cold
    assert zygote.forked[0].log_path == str(tmp_path / "i-1.log")


def test_warm_pod_when_no_zygote_can_fork(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cold: list[object]
) -> None:
    pod = FakePod()
    launcher = node(tmp_path, monkeypatch, FakeZygote(works=False), FakePool([pod]))
    handle = launcher.launch(start(), 9001)
    assert handle.path == "warm_pod"
    assert handle.fallbacks == ["fork: zygote 7 is gone"]
    assert pod.started[0].weights_cache == str(tmp_path / "cache")  # maps from the DRAM cache


def test_cold_when_nothing_faster_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cold: list[object]
) -> None:
    launcher = node(tmp_path, monkeypatch, FakeZygote(works=False), FakePool([FakePod(False)]))
    handle = launcher.launch(start(), 9001)
    assert handle.path == "cold"
    assert handle.fallbacks == ["fork: zygote 7 is gone", "warm_pod: warm pod 8 exited"]
    handle = launcher.launch(start(), 9002)  # the pool is empty now
    assert handle.fallbacks[1] == "warm_pod: no pod ready"


def test_cold_on_a_bare_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cold: list[object]
) -> None:
    handle = node(tmp_path, monkeypatch).launch(start(), 9001)
    assert handle.path == "cold"
    assert handle.fallbacks == [
        "fork: no zygote of this model (CPU, same dtype)",
        "warm_pod: no pool",
    ]


@pytest.mark.parametrize(
    ("engine_args", "forks"),
    [
        ({}, True),
        ({"dtype": "float32"}, True),
        ({"dtype": "bfloat16"}, False),
        ({"device": "cuda"}, False),
    ],
)
def test_a_zygote_forks_only_what_its_weights_fit(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cold: list[object],
    engine_args: dict[str, object],
    forks: bool,
) -> None:
    launcher = node(tmp_path, monkeypatch, FakeZygote())
    assert (launcher.launch(start(**engine_args), 9001).path == "fork") is forks


def test_paths_can_be_restricted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cold: list[object]
) -> None:
    launcher = node(tmp_path, monkeypatch, FakeZygote(works=False))
    with pytest.raises(ScaleOutError):
        launcher.launch(start(), 9001, paths=("fork",))
    assert not cold


def test_a_bad_start_is_refused_before_any_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cold: list[object]
) -> None:
    zygote = FakeZygote()
    launcher = node(tmp_path, monkeypatch, zygote)
    with pytest.raises(InvalidStart):
        launcher.launch(start(port=1), 9001)  # the agent sets the port itself
    assert not zygote.forked


def test_every_path_hands_flowserve_the_cold_flags() -> None:
    spec = start(max_model_len=256, kv_cache_memory=1 << 24)
    command = StartCommand.of(spec, 9001, host="127.0.0.1", log_path="/l", requested_at=1.0)
    assert command.flowserve_argv() == flowserve_command(spec, 9001, "127.0.0.1")[3:]
    cached = StartCommand.of(
        spec, 9001, host="127.0.0.1", log_path="/l", requested_at=1.0, weights_cache="/dev/shm/c"
    )
    args = parse_args(cached.flowserve_argv())
    assert (args.max_model_len, args.kv_cache_memory, args.weights_from_cache) == (
        256,
        1 << 24,
        "/dev/shm/c",
    )
    assert StartCommand.from_json(cached.to_json()) == cached


def test_startup_stages_are_consecutive_and_add_up() -> None:
    # A pre-warmed pod: its pod and runtime marks come before the request.
    clock = StartupClock("warm_pod", requested_at=100.0, pod_at=50.0, runtime_at=60.0)
    assert clock.report() is None  # not ready yet
    clock.mark_ready(100.4, "dram_cache")
    clock.ready_at = 100.5
    report = clock.report()
    assert report is not None
    assert (report.pod_ready_s, report.runtime_preload_s) == (0.0, 0.0)
    assert report.weight_load_s == pytest.approx(0.4)
    assert report.post_load_s == pytest.approx(0.1)
    cold = StartupClock("cold", 100.0, 100.01, 104.0, weights_at=107.0, ready_at=107.5)
    stages = cold.report()
    assert stages is not None
    total = (
        stages.pod_ready_s + stages.runtime_preload_s + stages.weight_load_s + stages.post_load_s
    )
    assert total == pytest.approx(7.5)
