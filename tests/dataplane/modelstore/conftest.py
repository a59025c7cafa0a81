from __future__ import annotations

import os

# Set before transformers is imported: the model store must never reach a model hub, and any
# attempt should fail the test rather than download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from dataplane.modelstore import create_random  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny random model shared by the read-only tests; copy it before changing it."""
    return create_random(tmp_path_factory.mktemp("store") / "tiny", "tiny")
