"""What this machine offers: CPUs, memory and GPUs, without importing torch."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from controlplane.wire import NodeResources

log = logging.getLogger(__name__)


def detect_resources() -> NodeResources:
    gpus = count_gpus()
    return NodeResources(
        cpus=os.cpu_count() or 1,
        memory_bytes=memory_bytes(),
        gpus=gpus,
        device="cuda" if gpus > 0 else "cpu",
    )


def parse_meminfo(text: str) -> int | None:
    """Bytes of `MemTotal` in the text of /proc/meminfo, or None if it is not there."""
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.strip() == "MemTotal":
            fields = rest.split()
            if not fields or not fields[0].isdigit():
                return None
            unit = fields[1].lower() if len(fields) > 1 else "b"
            scale = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}.get(unit)
            return int(fields[0]) * scale if scale is not None else None
    return None


def memory_bytes() -> int:
    try:
        found = parse_meminfo(Path("/proc/meminfo").read_text())
    except OSError:
        found = None
    if found is not None:
        return found
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def parse_gpu_list(text: str) -> int:
    """How many GPUs `nvidia-smi -L` lists (one `GPU <n>: ...` line each)."""
    return sum(1 for line in text.splitlines() if line.startswith("GPU "))


def count_gpus() -> int:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        done = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi -L failed: %s", exc)
        return 0
    if done.returncode != 0:
        log.warning("nvidia-smi -L exited with %d: %s", done.returncode, done.stderr.strip())
        return 0
    return parse_gpu_list(done.stdout)
