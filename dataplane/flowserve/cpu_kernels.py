"""FlowServe's own CPU kernels, built from `csrc/` with the system C compiler on first use.

The build is cached per source, compiler and CPU (it is compiled for the host's instruction set)
under `$FLOWSERVE_KERNEL_CACHE` (default `~/.cache/deepflow/kernels`). Where no compiler is found
or the build fails, `paged_decode_kernel()` returns None and attention keeps its PyTorch path;
`FLOWSERVE_CPU_KERNELS=0` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "paged_decode.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]
_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "deepflow" / "kernels"
    return Path(os.environ.get("FLOWSERVE_KERNEL_CACHE", default))


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), compiler, version, *FLAGS, _cpu_signature()]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"paged_decode-{platform.machine()}-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
        os.replace(built, target)  # atomic: concurrent builders all end with a whole file
    return target


@functools.cache
def paged_decode_kernel() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """The compiled decode kernel, or None (kernels off, no compiler, or the build failed)."""
    if os.environ.get("FLOWSERVE_CPU_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: CPU decode attention uses the PyTorch path")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except OSError as exc:
        log.warning("CPU kernels unavailable, using the PyTorch path: %s", exc)
        return None
    fn = lib.flowserve_paged_decode_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [_ptr] * 6 + [_i64] * 6 + [ctypes.c_float, _i64]
    return fn


def paged_decode(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim] float32, contiguous
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int64
    context_lens: torch.Tensor,  # [num_seqs] int64
    scale: float,
) -> torch.Tensor:
    """Decode attention straight from the paged cache; the caller checks `usable` first."""
    fn = paged_decode_kernel()
    assert fn is not None
    num_seqs, num_heads, head_dim = q.shape
    _num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the CPU decode kernel needs contiguous K/V caches")
    q = q.contiguous()
    tables = block_tables.contiguous()
    lens = context_lens.contiguous()
    out = torch.empty_like(q)
    status = fn(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        tables.data_ptr(),
        lens.data_ptr(),
        out.data_ptr(),
        num_seqs,
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        tables.shape[1],
        scale,
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("the CPU decode kernel could not allocate its scratch memory")
    return out


def usable(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """True when the kernel applies: float32 CPU tensors, a contiguous cache, and it built."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and k_cache.dtype == torch.float32
        and k_cache.is_contiguous()
        and paged_decode_kernel() is not None
    )
