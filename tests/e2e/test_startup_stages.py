"""Through the real processes: an instance's record says how the node agent started it (the
launch path and the four stages from its /health) and how long registration took, and the CLI
shows them."""

from __future__ import annotations

import json
import time

from tests.e2e.conftest import Platform

STAGES = ("pod_ready_s", "runtime_preload_s", "weight_load_s", "post_load_s")


def test_instance_record_has_path_stages_and_registration(platform: Platform) -> None:
    info = platform.deploy("tiny-stages", replicas=1)
    (instance,) = [i for i in info["instances"] if i["state"] == "ready"]
    record: dict = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        record = platform.api("GET", f"/api/v1/instances/{instance['id']}").json()
        if record["registration_s"] is not None:
            break
        time.sleep(0.1)
    assert record["launch_path"] in ("fork", "warm_pod", "cold"), record
    assert record["startup"]["path"] == record["launch_path"]
    assert all(record["startup"][stage] >= 0 for stage in STAGES)
    assert 0 <= record["registration_s"] < 30

    shown = platform.cli("instances", "get", instance["id"], "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["registration_s"] == record["registration_s"]
    table = platform.cli("instances", "get", instance["id"])
    assert "registration" in table.stdout and "weight load" in table.stdout
    listed = platform.cli("instances", "list", "--deployment", "tiny-stages")
    assert record["launch_path"] in listed.stdout
    assert platform.api("DELETE", "/api/v1/deployments/tiny-stages").status_code == 200
