"""The real `deepflow` console script against the running platform."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import Platform

pytestmark = pytest.mark.e2e


def test_status_deploy_chat_and_records_through_the_cli(platform: Platform) -> None:
    status = platform.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["url"] == platform.url

    deploy = platform.cli("deploy", "cli-chat", "--model", "tiny", "--replicas", "1")
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr

    chat = platform.cli("chat", "cli-chat", "Hello there", "--max-tokens", "5")
    assert chat.returncode == 0, chat.stderr

    listed = platform.cli("requests", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    requests = json.loads(listed.stdout)
    latest = requests[0] if isinstance(requests, list) else requests["data"][0]
    assert latest["state"] == "succeeded" and latest["deployment"] == "cli-chat"

    got = platform.cli("requests", "get", latest["id"], "--json")
    assert got.returncode == 0 and json.loads(got.stdout)["jobs"][0]["tasks"][0]["state"]

    missing = platform.cli("deployments", "get", "no-such-deployment")
    assert missing.returncode == 4 and len(missing.stderr.strip().splitlines()) == 1

    assert platform.cli("deployments", "delete", "cli-chat").returncode == 0
