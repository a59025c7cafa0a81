"""Scale-out on one GPU: weights into a new instance without the disk (`bench_scaling.py
--device cuda` runs this).

    python scripts/bench_scaling.py --device cuda [--preset llama-1b] [--json out.json]

In one process, on one model of random bf16 weights (Llama-3.2-1B's shapes by default):

1. DRAM cache -> GPU: the model's DRAM cache entry (one flat mapping) uploaded by each method of
   `flowserve.device_upload` (pageable, staged through pinned buffers, registered per upload,
   and registered ahead as a warm pod does: a second mapping of the entry, registered before the
   clock starts), interleaved, and the per-tensor copy FlowServe did before (`load_state_dict`
   from the mapping). The bound: a copy from a pinned buffer of the same size (the best the
   PCIe link gives).
2. A FlowServe instance A started by the launcher (`cold`, weights from disk) exports its
   weights; a second, B, is launched on the `ipc` path and copies them device-to-device. Their
   startup reports and a greedy answer from each (equal) are printed.
3. Weights into a new engine from a running instance, by CUDA IPC (share: the handles opened in
   place) and by device copy, timed from connecting to usable, from A (weights loaded tensor by
   tensor: one allocation each) and from B (one buffer: one handle).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.wire import InstanceHealth, InstanceStart  # noqa: E402
from dataplane.agent.process import free_port  # noqa: E402
from dataplane.flowserve import device_upload, registered_cache  # noqa: E402
from dataplane.flowserve.models import load_model  # noqa: E402
from dataplane.flowserve.weights_cache import open_cached  # noqa: E402
from dataplane.modelstore import create_random  # noqa: E402
from dataplane.scaleout import cuda_share  # noqa: E402
from dataplane.scaleout.dram_cache import DramCache  # noqa: E402
from dataplane.scaleout.launcher import Launcher, share_socket  # noqa: E402

TARGET_IMPORT_S = 0.1
TARGET_UPLOAD_GB_S = 40.0
ENGINE_ARGS = {
    "device": "cuda",
    "dtype": "bfloat16",
    "enforce_eager": True,
    "max_model_len": 512,
    "max_num_seqs": 8,
    "kv_cache_memory": 1 << 30,
}
PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]


def pinned_bound(nbytes: int, device: torch.device, reps: int = 5) -> float:
    """GB/s of one copy from pinned memory: the link's practical ceiling."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.fill_(7)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e9


def upload_bandwidth(model: Path, cache: Path, reps: int) -> dict[str, Any]:
    device = torch.device("cuda")
    mapped = open_cached(cache, model, torch.bfloat16)  # before any registration: a mapping
    assert mapped is not None, "the entry was just preloaded"  # of its own, not registered
    results: dict[str, list[dict[str, float]]] = {
        "pageable": [],
        "staged": [],
        "staged-8-threads": [],
        "register": [],
        "registered": [],
    }
    rings = {
        "staged": device_upload.prepare(),  # made before the clock starts, as a warm pod does
        "staged-8-threads": device_upload.StagingRing(device_upload.CHUNK_BYTES, 3, 8),
    }
    began = time.perf_counter()  # as a warm pod does before it is handed its model
    registered = registered_cache.register_entries(cache, None)
    register_ahead_s = time.perf_counter() - began
    ahead = open_cached(cache, model, torch.bfloat16)  # the registered mapping
    assert ahead is not None
    ahead_ptr = next(iter(ahead.tensors.values())).untyped_storage().data_ptr()
    assert not registered or any(r.ptr == ahead_ptr for r in registered)
    for _ in range(reps):
        for name in results:
            method = "staged" if name in rings else name
            try:
                up = device_upload.upload(
                    ahead.tensors if name == "registered" else mapped.tensors,
                    device,
                    method,  # type: ignore[arg-type]
                    rings.get(name),
                )
            except device_upload.UploadError as exc:
                results[name].append({"error": str(exc)})  # type: ignore[dict-item]
                continue
            results[name].append(
                {"s": up.seconds, "gb_s": up.gb_per_s, "register_s": up.register_seconds}
            )
            del up
    per_tensor = []
    for _ in range(2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        m, _ = load_model(model, torch.bfloat16, device, max_positions=512, ready=mapped.tensors)
        torch.cuda.synchronize()
        per_tensor.append(time.perf_counter() - start)
        del m
    del ahead
    began = time.perf_counter()
    registered_cache.release()
    release_s = time.perf_counter() - began
    torch.cuda.empty_cache()
    summary: dict[str, Any] = {"nbytes": mapped.nbytes}
    for method, runs in results.items():
        ok = [r for r in runs if "s" in r]
        if not ok:
            summary[method] = {"error": runs[0].get("error")}
            continue
        summary[method] = {
            "median_s": statistics.median(r["s"] for r in ok),
            "median_gb_s": statistics.median(r["gb_s"] for r in ok),
            "best_gb_s": max(r["gb_s"] for r in ok),
            "register_s": statistics.median(r["register_s"] for r in ok),
        }
    if "error" not in summary["registered"]:  # outside the clock
        summary["registered"] |= {"register_ahead_s": register_ahead_s, "release_s": release_s}
    t = statistics.median(per_tensor)
    summary["per_tensor_load_state_dict"] = {"median_s": t, "median_gb_s": mapped.nbytes / t / 1e9}
    summary["pinned_bound_gb_s"] = pinned_bound(mapped.nbytes, device)
    return summary


def imports(socket_path: str, reps: int) -> dict[str, Any]:
    device = torch.device("cuda")
    out: dict[str, Any] = {}
    for mode in ("share", "copy"):
        times = []
        for _ in range(reps):
            imported = cuda_share.import_weights(socket_path, device, torch.bfloat16, mode)  # type: ignore[arg-type]
            times.append(imported.seconds)
            nbytes = imported.nbytes
            handles = len({t.untyped_storage().data_ptr() for t in imported.tensors.values()})
            del imported
        out[mode] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "nbytes": nbytes,
            "storages": handles,
        }
    torch.cuda.empty_cache()
    return out


def start(model: Path, name: str) -> InstanceStart:
    return InstanceStart(
        instance_id=name, model="bench", model_path=str(model), engine_args=ENGINE_ARGS
    )


async def answer(url: str) -> list[int]:
    body = {
        "request_id": "probe",
        "prompt_token_ids": PROMPT,
        "sampling": {"max_tokens": 8, "temperature": 0, "ignore_eos": True},
    }
    tokens: list[int] = []
    async with httpx.AsyncClient(timeout=60) as client:
        async with client.stream("POST", f"{url}/generate", json=body) as response:
            async for line in response.aiter_lines():
                event = json.loads(line)
                tokens += event.get("token_ids") or []
    return tokens


def instance_report(handle: Any) -> dict[str, Any]:
    startup = handle.wait_ready(300)
    health = InstanceHealth.model_validate(httpx.get(f"{handle.url}/health").json())
    return {
        "path": handle.path,
        "fallbacks": handle.fallbacks,
        "startup": startup.model_dump(),
        "ready_s": time.time() - handle.requested_at,
        "tokens": asyncio.run(answer(handle.url)),
        "model": health.model,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-scaling-gpu-"))
    model = work / f"{args.preset}-random"
    if not (model / "config.json").exists():
        began = time.perf_counter()
        create_random(model, args.preset, seed=0, dtype="bfloat16")
        print(f"wrote {args.preset} in {time.perf_counter() - began:.1f} s", file=sys.stderr)
    shm_free = shutil.disk_usage("/dev/shm").free
    cache = Path("/dev/shm" if shm_free > 8 << 30 else str(work)) / "deepflow-bench-cache"
    began = time.perf_counter()
    DramCache(cache).preload(model, "bfloat16")
    print(f"preloaded into {cache} in {time.perf_counter() - began:.1f} s", file=sys.stderr)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "commit": _commit(),
        "preset": args.preset,
        "cache_dir": str(cache),
    }
    torch.empty(1, device="cuda")
    print("DRAM cache -> GPU ...", file=sys.stderr)
    result["upload"] = upload_bandwidth(model, cache, args.reps)
    if args.only == "upload":
        shutil.rmtree(cache, ignore_errors=True)
        return result
    launcher = Launcher(log_dir=work / "logs", cache_dir=cache)
    handles = []
    try:
        print("instance A (cold, from disk) ...", file=sys.stderr)
        first = free_port()
        ports = [first, free_port(avoid=[first])]
        handles.append(launcher.launch(start(model, "a"), ports[0]))
        result["instance_a"] = instance_report(handles[0])
        print("instance B (ipc, device copy from A) ...", file=sys.stderr)
        handles.append(launcher.launch(start(model, "b"), ports[1]))
        result["instance_b"] = instance_report(handles[1])
        print("imports into this process ...", file=sys.stderr)
        result["import_from_a"] = imports(share_socket("a", ports[0]), args.reps)
        result["import_from_b"] = imports(share_socket("b", ports[1]), args.reps)
    finally:
        for handle in handles:
            handle.stop(grace_s=5)
        launcher.close()
        shutil.rmtree(cache, ignore_errors=True)
    return result


def _commit() -> str:
    if os.environ.get("BENCH_COMMIT"):  # a copy of the tree without its history
        return os.environ["BENCH_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(r: dict[str, Any]) -> None:
    up = r["upload"]
    gib = up["nbytes"] / 2**30
    print(f"{r['device']}, torch {r['torch']}, {r['date']}, commit {r['commit']}, {r['preset']}")
    print(f"\nDRAM cache -> GPU ({gib:.2f} GiB, median of the runs):")
    for method in ("pageable", "staged", "staged-8-threads", "register", "registered"):
        m = up[method]
        if "error" in m:
            print(f"  {method:16} refused: {m['error']}")
            continue
        extra = ""
        if method == "register":
            dma = up["nbytes"] / (m["median_s"] - m["register_s"]) / 1e9
            extra = f" (of which registration {m['register_s']:.3f} s; the DMA {dma:.1f} GB/s)"
        if method == "registered":
            extra = (
                f" (registered ahead in {m['register_ahead_s']:.3f} s, released in "
                f"{m['release_s']:.3f} s, both outside the clock)"
            )
        print(
            f"  {method:16} {m['median_s']:.3f} s  {m['median_gb_s']:6.1f} GB/s  "
            f"best {m['best_gb_s']:.1f}{extra}"
        )
    pt = up["per_tensor_load_state_dict"]
    print(f"  {'per-tensor':10} {pt['median_s']:.3f} s  {pt['median_gb_s']:6.1f} GB/s  (before)")
    print(f"  bound: one copy from pinned memory {up['pinned_bound_gb_s']:.1f} GB/s")
    best = max(
        (
            up[m]["median_gb_s"]
            for m in ("staged", "register", "registered")
            if "error" not in up[m]
        ),
        default=0.0,
    )
    upload_verdict = (
        f"  DRAM cache -> GPU: {best:.1f} GB/s (target {TARGET_UPLOAD_GB_S:g}): "
        f"{_verdict(best >= TARGET_UPLOAD_GB_S)}"
    )
    if "instance_a" not in r:
        print(f"\ntargets\n{upload_verdict}")
        return
    for name in ("instance_a", "instance_b"):
        inst = r[name]
        s = inst["startup"]
        print(
            f"\n{name}: path {inst['path']}, weights {s['weights_source']}, ready in "
            f"{inst['ready_s']:.2f} s (pod {s['pod_ready_s']:.2f}, runtime "
            f"{s['runtime_preload_s']:.2f}, weights {s['weight_load_s']:.3f}, post "
            f"{s['post_load_s']:.2f}); greedy {inst['tokens']}"
        )
    same = r["instance_a"]["tokens"] == r["instance_b"]["tokens"]
    print(f"  greedy answers equal: {same}")
    print("\nweights from a running instance into this process (median, min):")
    for peer in ("import_from_a", "import_from_b"):
        for mode in ("share", "copy"):
            m = r[peer][mode]
            print(
                f"  {peer[-1].upper()} {mode:5} {m['median_s'] * 1e3:7.1f} ms  "
                f"{m['min_s'] * 1e3:7.1f} ms  ({m['nbytes'] / 2**30:.2f} GiB, "
                f"{m['storages']} storages)"
            )
    print("\ntargets")
    for mode in ("share", "copy"):
        v = min(r["import_from_a"][mode]["median_s"], r["import_from_b"][mode]["median_s"])
        ok = _verdict(v <= TARGET_IMPORT_S)
        print(f"  weights by {mode}: {v:.3f} s (target {TARGET_IMPORT_S} s): {ok}")
    print(upload_verdict)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", choices=["upload"], default=None, help="only the DRAM part")
    args, _ = parser.parse_known_args(argv)
    if not torch.cuda.is_available():
        print("bench_scaling --device cuda: no CUDA device", file=sys.stderr)
        return 1
    result = run(args)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
