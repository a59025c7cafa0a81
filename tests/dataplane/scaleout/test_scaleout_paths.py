"""Every launch path for real, on loopback: a forked instance, a warm pod and a cold process
each answer /generate with the greedy tokens of an engine loaded from disk, forked instances
share the weights' pages, and stopping any of them leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from controlplane.wire import InstanceStart, SemiPDConfig
from dataplane.agent.process import free_port
from dataplane.flowserve import weights_cache as wc
from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.engine import Engine
from dataplane.flowserve.sampling_params import SamplingParams
from dataplane.flowserve.startup import LaunchPath
from dataplane.scaleout.handles import InstanceHandle
from dataplane.scaleout.launcher import Launcher
from dataplane.scaleout.memory import file_mapping_use
from dataplane.scaleout.pool import WarmPool

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ENGINE_ARGS = {"kv_cache_memory": 1 << 20, "max_model_len": 128}
PROMPT = [5, 6, 7, 8, 9]


@dataclass
class Node:
    launcher: Launcher
    pool: WarmPool
    model: Path
    cache_dir: Path


@pytest.fixture(scope="module")
def node(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    work = tmp_path_factory.mktemp("scaleout-node")
    pool = WarmPool(1, log_dir=work / "logs", torch_threads=1)
    launcher = Launcher(log_dir=work / "logs", cache_dir=work / "cache", pool=pool, torch_threads=1)
    pool.start()
    try:
        launcher.start_zygote(str(tiny_dir), timeout_s=120)
        assert pool.wait_full(120), "no warm pod"
        yield Node(launcher, pool, tiny_dir, work / "cache")
    finally:
        pods = [p.pid for p in pool._ready]  # noqa: SLF001 (to check they go)
        zygotes = [z.proc.pid for z in launcher._zygotes.values()]  # noqa: SLF001
        launcher.close()
        for pid in pods + zygotes:
            assert_gone(pid)


def launch(
    node: Node, path: LaunchPath, instance_id: str, semi_pd: SemiPDConfig | None = None
) -> InstanceHandle:
    spec = InstanceStart(
        instance_id=instance_id,
        model="tiny",
        model_path=str(node.model),
        engine_args=ENGINE_ARGS,
        semi_pd=semi_pd,
    )
    handle = node.launcher.launch(spec, free_port(), paths=(path,))
    assert handle.path == path, handle.fallbacks
    return handle


def generate(url: str) -> list[int]:
    body = {
        "request_id": "r",
        "prompt_token_ids": PROMPT,
        "sampling": {"max_tokens": 10, "temperature": 0, "ignore_eos": True},
    }
    tokens: list[int] = []
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            event = json.loads(line)
            if event["type"] == "delta":
                tokens += event["token_ids"]
    return tokens


def expected_tokens(model: Path) -> list[int]:
    engine = Engine(EngineConfig(str(model), kv_cache_bytes=1 << 20, max_model_len=128))
    engine.add_request("r", PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    tokens: list[int] = []
    while engine.has_unfinished():
        tokens += [o.new_token_id for o in engine.step() if o.new_token_id is not None]
    return tokens


def assert_gone(pid: int, timeout_s: float = 10.0) -> None:
    """Neither the process nor anything in its process group is left."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"process group {pid} is still there")
    try:
        with open(f"/proc/{pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # at most unreaped
    except FileNotFoundError:
        pass


@pytest.mark.parametrize(
    ("path", "source"), [("fork", "zygote"), ("warm_pod", "dram_cache"), ("cold", "disk")]
)
def test_each_path_serves_the_greedy_tokens_from_disk(
    node: Node, path: LaunchPath, source: str
) -> None:
    handle = launch(node, path, f"{path}-1")
    try:
        startup = handle.wait_ready(120)
        assert (startup.path, startup.weights_source) == (path, source)
        assert generate(handle.url) == expected_tokens(node.model)
        health = httpx.get(f"{handle.url}/health").json()
        assert health["instance_id"] == f"{path}-1" and health["startup"]["path"] == path
    finally:
        code = handle.stop(grace_s=10)
    assert code == 0  # drained and exited on SIGTERM
    assert_gone(handle.pid)


def test_forked_instances_share_the_weight_pages(node: Node) -> None:
    handles = [launch(node, "fork", f"fork-share-{i}") for i in range(2)]
    try:
        for handle in handles:
            handle.wait_ready(120)
            generate(handle.url)  # touches every weight page
        zygote = node.launcher.zygote_for(
            InstanceStart(instance_id="x", model="tiny", model_path=str(node.model))
        )
        assert zygote is not None
        data = str(node.cache_dir / wc.ENTRIES_DIR / zygote.entry / wc.DATA_FILE)
        for handle in handles:
            use = file_mapping_use(handle.pid, data)
            assert use.rss > 0
            # Mapped by the zygote and both children: each holds about a third of the pages.
            assert use.pss <= use.rss // 2, use
            assert use.uss == 0, use
    finally:
        for handle in handles:
            handle.stop(grace_s=10)
    for handle in handles:
        assert_gone(handle.pid)


def test_a_warm_pod_is_replaced_after_it_is_taken(node: Node) -> None:
    assert node.pool.wait_full(120)
    handle = launch(node, "warm_pod", "warm-refill")
    try:
        assert node.pool.wait_full(120), "the pool did not refill"
        handle.wait_ready(120)
    finally:
        handle.stop(grace_s=10)
    assert_gone(handle.pid)


@pytest.mark.parametrize("path", ["fork", "warm_pod", "cold"])
def test_each_path_serves_semi_pd(node: Node, path: LaunchPath) -> None:
    """A semi-pd deployment's instance runs FlowServe's semi-PD engine whichever path starts it
    (the in-process paths build the engine as the cold one does), with the same greedy tokens."""
    if path == "warm_pod":
        assert node.pool.wait_full(120)
    config = SemiPDConfig(slo_ttft_ms=400, slo_tpot_ms=80, split=30)
    handle = launch(node, path, f"semi-{path}", config)
    try:
        handle.wait_ready(120)
        assert generate(handle.url) == expected_tokens(node.model)
        report = httpx.get(f"{handle.url}/semipd", timeout=10).json()
        assert (report["slo_ttft_s"], report["slo_tpot_s"]) == (0.4, 0.08)
        assert report["static"] is False and report["prefill_share"] == 30
    finally:
        code = handle.stop(grace_s=10)
    assert code == 0
    assert_gone(handle.pid)


def test_a_forked_instance_ends_with_its_zygote(tiny_dir: Path, tmp_path: Path) -> None:
    launcher = Launcher(log_dir=tmp_path / "logs", cache_dir=tmp_path / "cache", torch_threads=1)
    launcher.start_zygote(str(tiny_dir), timeout_s=120)
    spec = InstanceStart(
        instance_id="orphan", model="tiny", model_path=str(tiny_dir), engine_args=ENGINE_ARGS
    )
    handle = launcher.launch(spec, free_port(), paths=("fork",))
    try:
        handle.wait_ready(120)
        launcher.stop_zygote(str(tiny_dir))
        deadline = time.monotonic() + 20
        while handle.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert handle.poll() in (0, -signal.SIGTERM)
    finally:
        handle.stop(grace_s=5)
        launcher.close()
    assert_gone(handle.pid)
