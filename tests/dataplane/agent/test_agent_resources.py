from __future__ import annotations

import os

from dataplane.agent.resources import detect_resources, parse_gpu_list, parse_meminfo


def test_parse_meminfo() -> None:
    text = "MemTotal:       16318412 kB\nMemFree:         1000 kB\n"
    assert parse_meminfo(text) == 16318412 * 1024
    assert parse_meminfo("MemFree: 1 kB\n") is None
    assert parse_meminfo("MemTotal: lots\n") is None


def test_parse_gpu_list() -> None:
    text = (
        "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\n"
        "  MIG 1g.10gb Device 0: (UUID: MIG-1)\n"
        "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)\n"
    )
    assert parse_gpu_list(text) == 2
    assert parse_gpu_list("") == 0


def test_detect_resources() -> None:
    found = detect_resources()
    assert found.cpus == os.cpu_count()
    assert found.memory_bytes > 0
    assert found.device == ("cuda" if found.gpus else "cpu")
