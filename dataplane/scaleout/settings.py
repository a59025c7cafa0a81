"""Where a node keeps its DRAM preload cache and its instances' weight sockets (importable
without torch)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CACHE_ROOT = Path("/dev/shm/deepflow-cache")
CACHE_ROOT_ENV = "DEEPFLOW_CACHE_DIR"


def default_cache_root() -> Path:
    """$DEEPFLOW_CACHE_DIR, else /dev/shm/deepflow-cache (shared memory: DRAM)."""
    return Path(os.environ.get(CACHE_ROOT_ENV) or DEFAULT_CACHE_ROOT)


DEFAULT_SHARE_DIR = Path("/tmp/deepflow-share")
SHARE_DIR_ENV = "DEEPFLOW_SHARE_DIR"


def share_socket_dir() -> Path:
    """$DEEPFLOW_SHARE_DIR, else /tmp/deepflow-share: CUDA instances' weight sockets
    (cuda_share), short paths since a Unix socket's path is at most 107 bytes."""
    return Path(os.environ.get(SHARE_DIR_ENV) or DEFAULT_SHARE_DIR)
