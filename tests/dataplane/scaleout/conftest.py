"""Random-weight model folders for the scale-out tests, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataplane.modelstore import create_random


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scaleout-models")


@pytest.fixture(scope="session")
def tiny_dir(models_root: Path) -> Path:
    """Tied embeddings, a few hundred KB."""
    return create_random(models_root / "tiny", "tiny", seed=1)


@pytest.fixture(scope="session")
def tiny2_dir(models_root: Path) -> Path:
    return create_random(models_root / "tiny2", "tiny", seed=2)


@pytest.fixture(scope="session")
def tiny3_dir(models_root: Path) -> Path:
    return create_random(models_root / "tiny3", "tiny", seed=3)


@pytest.fixture(scope="session")
def small_dir(models_root: Path) -> Path:
    """An untied lm_head, a few MB."""
    return create_random(models_root / "small", "small", seed=1)


@pytest.fixture(scope="session")
def smollm2_shaped_dir(models_root: Path) -> Path:
    """Random weights in SmolLM2-135M's shapes (514 MiB in float32)."""
    return create_random(models_root / "smollm2-shaped", "smollm2-135m", seed=0)
