"""A semi-PD FlowServe instance over HTTP: /generate is the protocol of a colocated instance
and answers the same tokens under concurrent requests; /semipd reports the split and the
controller's records (404 on a colocated instance); /metrics carries the semi-PD series; the
command line builds the configuration."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from flowserve_live import LiveServer
from test_flowserve_engine import PROMPTS

from controlplane.wire import GenerateDelta, GenerateDone, InstanceHealth
from dataplane.flowserve.__main__ import engine_config, main, parse_args
from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.engine import Engine, open_engine
from dataplane.flowserve.sampling_params import SamplingParams
from dataplane.flowserve.semipd.engine import SemiPDEngine
from dataplane.flowserve.server import create_app

GREEDY = {"temperature": 0.0, "max_tokens": 12, "ignore_eos": True}


class SemiPDServer:
    """A semi-PD instance on a free loopback port, in a thread of this process."""

    def __init__(self, model_dir: Path) -> None:
        config = EngineConfig(
            str(model_dir),
            max_num_seqs=4,
            semi_pd=True,
            slo_ttft_ms=0.001,  # missed by every request: the controller switches
            slo_tpot_ms=60_000.0,
            semi_pd_window_s=0.5,
        )
        engine = open_engine(config)
        assert isinstance(engine, SemiPDEngine)
        self.engine = engine
        app = create_app(lambda: self.engine, model_name="tiny", instance_id="semi-1")
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> SemiPDServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            assert time.monotonic() < deadline and self._thread.is_alive(), "did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()


@pytest.fixture(scope="module")
def semi_pd_server(tiny_model_dir: Path) -> Iterator[SemiPDServer]:
    with SemiPDServer(tiny_model_dir) as server:
        yield server


def generate(url: str, request_id: str, prompt: str) -> tuple[list[int], GenerateDone]:
    body = {"request_id": request_id, "prompt": prompt, "sampling": GREEDY}
    with httpx.Client(base_url=url, timeout=60) as client:
        response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    lines = [json.loads(line) for line in response.text.splitlines()]
    deltas = [GenerateDelta.model_validate(x) for x in lines[:-1]]
    return [t for d in deltas for t in d.token_ids], GenerateDone.model_validate(lines[-1])


def test_generate_answers_as_a_colocated_instance(
    semi_pd_server: SemiPDServer, tiny_model_dir: Path
) -> None:
    results: dict[int, list[int]] = {}

    def one(i: int) -> None:
        ids, done = generate(semi_pd_server.url, f"g{i}", PROMPTS[i % len(PROMPTS)])
        assert done.completion_tokens == len(ids) == 12
        results[i] = ids

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    colocated = Engine(EngineConfig(str(tiny_model_dir), max_num_seqs=4))
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        colocated.add_request(f"c{i}", colocated.tokenizer(prompt)["input_ids"], params)
    expected: dict[str, list[int]] = {}
    while colocated.has_unfinished():
        for out in colocated.step():
            if out.new_token_id is not None:
                expected.setdefault(out.request_id, []).append(out.new_token_id)
    assert results == {i: expected[f"c{i % len(PROMPTS)}"] for i in range(8)}
    health = InstanceHealth.model_validate(httpx.get(semi_pd_server.url + "/health").json())
    assert (health.status, health.instance_id) == ("ok", "semi-1")


def test_semipd_endpoint_and_metrics(semi_pd_server: SemiPDServer) -> None:
    # Rounds of requests until a window has seen enough of them (TTFT always misses).
    deadline = time.monotonic() + 60
    while not semi_pd_server.engine.report().records:
        assert time.monotonic() < deadline, "the controller never switched"
        threads = [
            threading.Thread(target=generate, args=(semi_pd_server.url, f"m{i}", "Hello"))
            for i in range(10)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    report = httpx.get(semi_pd_server.url + "/semipd").json()
    assert report["prefill_share"] > 50 and report["total_units"] >= 1
    record = report["records"][0]
    assert (record["reason"], record["old_share"], record["new_share"]) == ("ttft_miss", 50, 60)
    assert record["window"]["ttft_p90"] > record["slo_ttft_s"]
    metrics = httpx.get(semi_pd_server.url + "/metrics").text
    share = f'flowserve:semipd_prefill_share{{model_name="tiny"}} {float(report["prefill_share"])}'
    assert share in metrics
    assert 'flowserve:semipd_switches_total{model_name="tiny",reason="ttft_miss"}' in metrics
    assert "flowserve:semipd_ttft_p90_seconds" in metrics


def test_semipd_endpoint_is_404_on_a_colocated_instance(live_server: LiveServer) -> None:
    response = httpx.get(live_server.url + "/semipd")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_semi_pd"


def test_command_line(tmp_path: Path) -> None:
    argv = ["--model", "/m", "--port", "9000"]
    config = engine_config(parse_args(argv))
    assert not config.semi_pd
    args = parse_args(
        [
            *argv,
            "--semi-pd",
            "--slo-ttft-ms",
            "300",
            "--slo-tpot-ms",
            "150",
            "--semi-pd-split",
            "70",
        ]
    )
    config = engine_config(args)
    assert (config.semi_pd, config.slo_ttft_ms, config.slo_tpot_ms) == (True, 300.0, 150.0)
    assert (config.semi_pd_split, config.semi_pd_static, config.semi_pd_window_s) == (
        70,
        False,
        5.0,
    )
    static = engine_config(parse_args([*argv, "--semi-pd", "--semi-pd-static"]))
    assert static.semi_pd_static and static.slo_ttft_ms is None
    assert main([*argv, "--semi-pd"]) == 2  # dynamic partitioning needs both SLOs
