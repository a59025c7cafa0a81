"""The control plane app in-process: management routes, and the 503 path with its records."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from controlplane.app import create_app
from controlplane.settings import Settings
from dataplane.modelstore import create_random


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_random(tmp_path_factory.mktemp("models") / "tiny", "tiny")


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> TestClient:
    settings = dataclasses.replace(
        Settings(home=tmp_path, database_url=database_url), dispatch_timeout_s=0.3
    )
    with TestClient(create_app(settings)) as c:
        yield c


def test_models_and_deployments_routes(client: TestClient, tiny_model: Path) -> None:
    reply = client.post("/api/v1/models", json={"name": "tiny", "path": str(tiny_model)})
    assert reply.status_code == 201, reply.text
    assert reply.json()["architecture"] == "LlamaForCausalLM"
    assert (
        client.post("/api/v1/models", json={"name": "tiny", "path": str(tiny_model)}).status_code
        == 409
    )
    bad = client.post("/api/v1/models", json={"name": "x", "path": "/nonexistent"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "path"
    assert (
        client.post("/api/v1/models", json={"name": "Bad Name!", "path": "/x"}).status_code == 400
    )

    reply = client.post("/api/v1/deployments", json={"name": "d", "model": "tiny", "replicas": 0})
    assert reply.status_code == 201 and reply.json()["replicas"] == 0
    missing = client.post("/api/v1/deployments", json={"name": "e", "model": "nope"})
    assert missing.status_code == 404
    assert client.patch("/api/v1/deployments/d", json={"replicas": 2}).json()["replicas"] == 2
    assert client.get("/api/v1/deployments/zz").status_code == 404
    assert client.delete("/api/v1/deployments/d").status_code == 200
    assert client.get("/api/v1/deployments").json()["data"] == []
    assert client.get("/api/v1/requests?limit=0").status_code == 400


def test_no_ready_instance_is_503_and_records_end_failed(
    client: TestClient, tiny_model: Path
) -> None:
    client.post("/api/v1/models", json={"name": "tiny", "path": str(tiny_model)})
    client.post("/api/v1/deployments", json={"name": "d", "model": "tiny", "replicas": 0})
    client.app.state.reconciler.kick()
    for _ in range(50):
        if client.get("/v1/models").json()["data"]:
            break
        time.sleep(0.05)
    body = {"model": "d", "messages": [{"role": "user", "content": "hi"}]}
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"]["code"] == "no_ready_instance"
    (record,) = client.get("/api/v1/requests").json()["data"]
    full = client.get(f"/api/v1/requests/{record['id']}").json()
    assert full["state"] == "failed"
    assert full["jobs"][0]["state"] == "failed"
    assert full["jobs"][0]["tasks"][0]["state"] == "failed"


def test_deployment_modes_and_groups(client: TestClient, tiny_model: Path) -> None:
    client.post("/api/v1/models", json={"name": "tiny", "path": str(tiny_model)})

    def create(**body: object) -> object:
        return client.post("/api/v1/deployments", json={"model": "tiny", **body})

    pd = create(name="pd", mode="disaggregated", prefill_replicas=0, decode_replicas=0)
    assert pd.status_code == 201, pd.text
    info = pd.json()
    assert info["mode"] == "disaggregated" and info["replicas"] == 0
    assert info["groups"] == [
        {"role": "prefill", "replicas": 0, "ready_replicas": 0},
        {"role": "decode", "replicas": 0, "ready_replicas": 0},
    ]
    plain = create(name="plain", replicas=0).json()
    assert plain["mode"] == "colocated"
    assert plain["groups"] == [{"role": "colocated", "replicas": 0, "ready_replicas": 0}]

    for body, param in (
        ({"name": "a", "prefill_replicas": 1}, "prefill_replicas"),
        ({"name": "b", "mode": "disaggregated", "replicas": 2}, "replicas"),
        ({"name": "c", "mode": "colocated", "decode_replicas": 1}, "decode_replicas"),
        ({"name": "e", "mode": "split"}, "mode"),
        ({"name": "f", "mode": "auto", "prefill_replicas": 257}, "prefill_replicas"),
        ({"name": "g", "mode": "auto", "max_replicas": 2, "decode_replicas": 3}, "decode_replicas"),
    ):
        reply = create(**body)
        assert reply.status_code == 400, (body, reply.text)
        assert reply.json()["error"]["param"] == param, reply.text
    assert [d["name"] for d in client.get("/api/v1/deployments").json()["data"]] == [
        "pd",
        "plain",
    ]

    def patch(name: str, **body: object) -> object:
        return client.patch(f"/api/v1/deployments/{name}", json=body)

    assert patch("pd", decode_replicas=0).status_code == 200
    refused = patch("pd", replicas=1)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "group_not_in_mode"
    unsafe = patch("plain", mode="disaggregated")
    assert unsafe.status_code == 400
    assert unsafe.json()["error"]["code"] == "unsafe_mode_change"
    assert "auto first" in unsafe.json()["error"]["message"]
    auto = patch("plain", mode="auto", prefill_replicas=0, decode_replicas=0)
    assert auto.status_code == 200 and auto.json()["mode"] == "auto"
    assert [g["role"] for g in auto.json()["groups"]] == ["colocated", "prefill", "decode"]
    back = patch("plain", mode="colocated").json()
    assert back["mode"] == "colocated" and len(back["groups"]) == 1
    scaling = client.get("/api/v1/deployments/plain/scaling").json()["data"]
    assert all(e["role"] is None or e["role"] in ("prefill", "decode") for e in scaling)


def test_semi_pd_deployments_at_the_api_edge(client: TestClient, tiny_model: Path) -> None:
    client.post("/api/v1/models", json={"name": "tiny", "path": str(tiny_model)})

    def create(**body: object) -> object:
        return client.post("/api/v1/deployments", json={"model": "tiny", **body})

    slos = {"slo_ttft_ms": 300, "slo_tpot_ms": 50}
    reply = create(name="semi", mode="semi-pd", replicas=0, semi_pd_split=40, **slos)
    assert reply.status_code == 201, reply.text
    info = reply.json()
    assert info["mode"] == "semi-pd" and info["replicas"] == 0
    assert info["groups"] == [{"role": "colocated", "replicas": 0, "ready_replicas": 0}]
    assert info["semi_pd"] == {"slo_ttft_ms": 300, "slo_tpot_ms": 50, "split": 40, "static": False}
    assert client.get("/api/v1/deployments/semi").json()["semi_pd"] == info["semi_pd"]

    for body, param, code in (
        (
            {"name": "a", "mode": "semi-pd", "slo_ttft_ms": 300},
            "slo_tpot_ms",
            "semi_pd_slo_required",
        ),
        (
            {"name": "b", "slo_ttft_ms": 300, "slo_tpot_ms": 50},
            "slo_ttft_ms",
            "semi_pd_not_in_mode",
        ),
        ({"name": "c", "mode": "semi-pd", "slo_ttft_ms": 0, "slo_tpot_ms": 5}, "slo_ttft_ms", None),
        ({"name": "d", "mode": "semi-pd", "semi_pd_split": 100, **slos}, "semi_pd_split", None),
        ({"name": "e", "mode": "semi-pd", "prefill_replicas": 1, **slos}, "prefill_replicas", None),
    ):
        reply = create(**body)
        assert reply.status_code == 400, (body, reply.text)
        error = reply.json()["error"]  # OpenAI's shape
        assert error["type"] == "invalid_request_error" and error["param"] == param, reply.text
        assert error["code"] == (code or error["code"]) and error["message"]
    assert [d["name"] for d in client.get("/api/v1/deployments").json()["data"]] == ["semi"]

    def patch(name: str, **body: object) -> object:
        return client.patch(f"/api/v1/deployments/{name}", json=body)

    faster = patch("semi", slo_ttft_ms=200, semi_pd_static=True)
    assert faster.status_code == 200, faster.text
    assert faster.json()["semi_pd"] == {
        "slo_ttft_ms": 200,
        "slo_tpot_ms": 50,
        "split": 40,
        "static": True,
    }
    plain = create(name="plain", replicas=0).json()
    assert plain["semi_pd"] is None
    refused = patch("plain", slo_ttft_ms=200)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "semi_pd_not_in_mode"
    assert patch("plain", mode="semi-pd", slo_ttft_ms=1).json()["error"]["param"] == "slo_tpot_ms"
    to_semi = patch("plain", mode="semi-pd", **slos).json()
    assert to_semi["mode"] == "semi-pd" and to_semi["semi_pd"]["slo_tpot_ms"] == 50
    back = patch("semi", mode="colocated").json()
    assert back["mode"] == "colocated" and back["semi_pd"] is None
    scaling = client.get("/api/v1/deployments/semi/scaling").json()["data"]
    assert [e["reason"] for e in scaling if e["kind"] == "manual"] == [
        "semi-pd -> colocated",
        "semi-PD settings changed by hand",
    ]
