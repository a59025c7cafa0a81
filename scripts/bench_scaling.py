"""Scale-out on one node, by launch path: cold process, warm pod + DRAM cache, fork.

    python scripts/bench_scaling.py                         # SmolLM2-135M-shaped random model
    python scripts/bench_scaling.py --model DIR --count 64 --plot docs/benchmarks/scaling-cpu.png
    python scripts/bench_scaling.py --device cuda           # the GPU half: bench_scaling_gpu.py

Two measurements per path (paths: `dataplane.scaleout.launcher`):

1. First token from zero replicas: one instance is asked for; the time from the request to launch
   it to the first token of a one-token request. Before the clock starts: the warm pool has a
   ready pod and the model is in the DRAM cache (warm_pod), the model's zygote holds the weights
   (fork); nothing (cold: a fresh `python -m dataplane.flowserve`, imports, weights from disk).
2. 1 -> N instances: N launches back to back; an instance is ready when it has answered a
   one-token request. Per instance, the five scale-up stages: pod ready, runtime pre-load, weight
   load and post-load from the instance's /health `startup` report, and registration, which in
   this data-plane-only benchmark is the time from the instance's ready mark to its first answered
   request (in the platform it is the control plane learning of it). Cold and warm pods run fewer
   instances (each costs its own process's imports, and cold its own copy of the weights); the
   naive-cold time for N is extrapolated linearly from the measured count, as is its memory.

After the fork run, the memory of the forked instances: RSS, PSS and USS summed over them from
/proc/<pid>/smaps_rollup (PSS counts a page shared by k processes as 1/k in each).

Every instance gets 1 torch thread and a 16 MiB KV cache. Launches go one after another, as an
agent's would; each instance is probed from its launch on: a TCP connect every 20 ms until it
accepts (an instance binds its port once ready; a refused connect costs next to nothing, unlike
polling /health), then the request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from controlplane.wire import InstanceHealth, InstanceStart
from dataplane.agent.process import free_port
from dataplane.flowserve.startup import LaunchPath
from dataplane.scaleout.dram_cache import DramCache
from dataplane.scaleout.handles import InstanceHandle
from dataplane.scaleout.launcher import ALL_PATHS, Launcher
from dataplane.scaleout.memory import MemoryUse, total_use
from dataplane.scaleout.pool import WarmPool

ROOT = Path(__file__).resolve().parent.parent
ENGINE_ARGS = {"kv_cache_memory": 16 << 20, "max_model_len": 512, "max_num_seqs": 8}
# The readiness probe: a 4-token prompt, 1 token out. Its cost is mostly one pass over the weights
# (memory bound on a CPU), the same for every path.
PROMPT = [1, 2, 3, 4]
PROBE_INTERVAL_S = 0.02
STAGES = ("pod_ready_s", "runtime_preload_s", "weight_load_s", "post_load_s", "registration_s")
TARGET_FIRST_TOKEN_S = 1.0
TARGET_ALL_READY_S = 10.0
TARGET_SPEEDUP = 10.0


@dataclass(slots=True)
class Ready:
    path: str
    requested_at: float
    answered_at: float  # the one-token request's answer came back
    stages: dict[str, float]

    @property
    def seconds(self) -> float:
        return self.answered_at - self.requested_at


async def wait_listening(handle: InstanceHandle, timeout_s: float) -> None:
    """Until the instance accepts connections (it binds its port once ready). A refused connect
    costs next to nothing on either side, unlike polling /health."""
    host, port = handle.url.removeprefix("http://").rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection(host, int(port))
            writer.close()
            return
        except OSError:
            pass
        if handle.poll() is not None:
            raise RuntimeError(f"{handle.instance_id} ({handle.path}) exited: {handle.log_path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{handle.instance_id} ({handle.path}) not ready in {timeout_s} s")
        await asyncio.sleep(PROBE_INTERVAL_S)


async def first_answer(
    client: httpx.AsyncClient, handle: InstanceHandle, timeout_s: float
) -> Ready:
    await wait_listening(handle, timeout_s)
    body = {
        "request_id": "bench",
        "prompt_token_ids": PROMPT,
        "sampling": {"max_tokens": 1, "temperature": 0, "ignore_eos": True},
    }
    async with client.stream("POST", f"{handle.url}/generate", json=body) as response:
        async for line in response.aiter_lines():
            if json.loads(line)["type"] == "delta":
                break
    answered_at = time.time()
    health = InstanceHealth.model_validate((await client.get(f"{handle.url}/health")).json())
    assert health.startup is not None
    stages = health.startup.model_dump(exclude={"path", "weights_source"})
    ready_at = handle.requested_at + sum(stages.values())
    stages["registration_s"] = max(0.0, answered_at - ready_at)
    return Ready(handle.path, handle.requested_at, answered_at, stages)


def _start(model: str, instance_id: str) -> InstanceStart:
    return InstanceStart(
        instance_id=instance_id, model="bench", model_path=model, engine_args=ENGINE_ARGS
    )


async def launch_and_probe(
    launcher: Launcher,
    model: str,
    path: LaunchPath,
    n: int,
    timeout_s: float,
    handles: list[InstanceHandle],
) -> list[Ready]:
    """Launch n one after another (as an agent would, each call returns at once) and probe
    each from the moment it is launched, not after the last launch."""
    limits = httpx.Limits(max_connections=n * 2)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        probes = []
        for i in range(n):
            start = _start(model, f"{path}-{i}-{int(time.time() * 1000) % 100000}")
            port = free_port()
            handle = await asyncio.to_thread(launcher.launch, start, port, paths=(path,))
            handles.append(handle)
            if handle.path != path:
                raise RuntimeError(f"asked for {path}, got {handle.path}: {handle.fallbacks}")
            probes.append(asyncio.create_task(first_answer(client, handle, timeout_s)))
        return list(await asyncio.gather(*probes))


def run(
    launcher: Launcher, model: str, path: LaunchPath, n: int, timeout_s: float
) -> tuple[list[Ready], MemoryUse | None]:
    """Launch n, wait until each answered, measure their memory (and their zygote's), stop."""
    if launcher.pool is not None:
        launcher.pool.resize(0)  # no replacement pods booting while we measure
    handles: list[InstanceHandle] = []
    try:
        readies = asyncio.run(launch_and_probe(launcher, model, path, n, timeout_s, handles))
        pids = [h.pid for h in handles]
        zygote = launcher.zygote_for(_start(model, "memory"))
        memory = total_use(pids + ([zygote.proc.pid] if zygote else [])) if n > 1 else None
    finally:
        for handle in handles:
            handle.stop(grace_s=5)
    left = [h.pid for h in handles if h.alive()]
    if left:
        raise RuntimeError(f"instances still running after stop: {left}")
    return readies, memory


def summarize(
    path: str, first: Ready, many: list[Ready], n_target: int, memory: MemoryUse | None
) -> dict[str, Any]:
    t0 = min(r.requested_at for r in many)
    all_ready = max(r.answered_at for r in many) - t0
    return {
        "path": path,
        "first_token_from_zero_s": round(first.seconds, 3),
        "first_stages": {k: round(v, 3) for k, v in first.stages.items()},
        "n": len(many),
        "all_ready_s": round(all_ready, 3),
        "all_ready_extrapolated_s": round(all_ready * n_target / len(many), 3),
        "median_stages": {
            s: round(statistics.median(r.stages[s] for r in many), 3) for s in STAGES
        },
        "ready_times_s": sorted(round(r.answered_at - t0, 3) for r in many),
        "memory": None if memory is None else asdict(memory),
    }


def plot(results: list[dict[str, Any]], n_target: int, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for result in results:
        times = result["ready_times_s"]
        counts = list(range(1, len(times) + 1))
        label = f"{result['path']}: {result['n']} ready in {result['all_ready_s']:.1f} s"
        ax.step([0.0, *times], [0, *counts], where="post", label=label)
    ax.axvline(
        TARGET_ALL_READY_S,
        color="grey",
        linestyle=":",
        label=f"target: {n_target} in {TARGET_ALL_READY_S:g} s",
    )
    ax.set_xlabel("seconds since the first launch request")
    ax.set_ylabel("instances ready (answered a request)")
    ax.set_title("Scale-out on one CPU node, by launch path")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=120)


def measure(
    path: LaunchPath,
    model: str,
    n: int,
    n_target: int,
    work: Path,
    cache_dir: Path,
    timeout_s: float,
) -> dict[str, Any]:
    """Set the path up (untimed), then first token from zero, then 1 -> n."""
    pool = WarmPool(1, log_dir=work / "logs", torch_threads=1) if path == "warm_pod" else None
    launcher = Launcher(log_dir=work / "logs", cache_dir=cache_dir, pool=pool, torch_threads=1)
    try:
        if path == "fork":
            launcher.start_zygote(model)  # preloads the DRAM cache too
        if pool is not None:
            DramCache(cache_dir).preload(model)
            pool.start()
            if not pool.wait_full(timeout_s):
                raise RuntimeError("the warm pool did not fill")
        print(f"{path}: first token from zero ...", file=sys.stderr)
        (first,), _ = run(launcher, model, path, 1, timeout_s)
        if pool is not None:
            pool.resize(n)
            if not pool.wait_full(timeout_s):
                raise RuntimeError("the warm pool did not refill")
        print(f"{path}: 1 -> {n} instances ...", file=sys.stderr)
        many, memory = run(launcher, model, path, n, timeout_s)
        return summarize(path, first, many, n_target, memory)
    finally:
        launcher.close()


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(results: list[dict[str, Any]], n_target: int) -> None:
    stage_names = " ".join(f"{s.removesuffix('_s')[:10]:>10}" for s in STAGES)
    print(f"{'path':9} {'TTFT0 s':>8} {'n':>3} {'ready s':>8} {'ready@N s':>10} {stage_names}")
    for r in results:
        stages = " ".join(f"{r['median_stages'][s]:>10.3f}" for s in STAGES)
        print(
            f"{r['path']:9} {r['first_token_from_zero_s']:>8.3f} {r['n']:>3} "
            f"{r['all_ready_s']:>8.2f} {r['all_ready_extrapolated_s']:>10.2f} {stages}"
        )
    print(
        f"\nTTFT0: first token from zero. ready@N: all {n_target} ready, extrapolated linearly "
        "where fewer ran. Stages: medians over the n instances."
    )
    for r in results:
        if r["memory"]:
            m = {k: v / 2**30 for k, v in r["memory"].items()}
            n = r["n"]
            who = f"{n} instances" + (" + zygote" if r["path"] == "fork" else "")
            print(
                f"memory {r['path']:9} {who}: RSS {m['rss']:.2f} GiB, "
                f"PSS {m['pss']:.2f} GiB, USS {m['uss']:.2f} GiB "
                f"(PSS per instance {m['pss'] / n * 1024:.0f} MiB)"
            )
    by_path = {r["path"]: r for r in results}
    print("\ntargets")
    if "warm_pod" in by_path:
        v = by_path["warm_pod"]["first_token_from_zero_s"]
        print(
            f"  first token from zero, warm pod + DRAM cache: {v:.3f} s "
            f"(target {TARGET_FIRST_TOKEN_S:g} s): {_verdict(v <= TARGET_FIRST_TOKEN_S)}"
        )
    if "fork" in by_path:
        v = by_path["fork"]["all_ready_extrapolated_s"]
        print(
            f"  {n_target} instances ready by fork: {v:.2f} s "
            f"(target {TARGET_ALL_READY_S:g} s): {_verdict(v <= TARGET_ALL_READY_S)}"
        )
        if "cold" in by_path:
            ratio = by_path["cold"]["all_ready_extrapolated_s"] / v
            print(
                f"  fork vs naive cold for {n_target}: {ratio:.1f}x faster "
                f"(target {TARGET_SPEEDUP:g}x): {_verdict(ratio >= TARGET_SPEEDUP)}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="a model folder (default: a random smollm2-135m)"
    )
    parser.add_argument("--paths", default="fork,warm_pod,cold")
    parser.add_argument("--count", type=int, default=64, help="N for fork (the target)")
    parser.add_argument("--warm-count", type=int, default=4, help="N for warm pods")
    parser.add_argument("--cold-count", type=int, default=2, help="N for cold")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--work-dir", default=None, help="logs, the DRAM cache (default: temp)")
    parser.add_argument("--plot", default=None, help="write the ready-over-time PNG here")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: weights into new instances on a GPU (scripts/bench_scaling_gpu.py)",
    )
    args, _ = parser.parse_known_args()
    if args.device == "cuda":
        from bench_scaling_gpu import main as bench_gpu

        return bench_gpu(sys.argv[1:])
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-scaling-"))
    model = args.model or str(random_model(Path(tempfile.gettempdir()) / "deepflow-bench-models"))
    asked = args.paths.split(",")
    paths = [p for p in ALL_PATHS if p in asked]
    cache_dir = Path("/dev/shm") / f"deepflow-bench-cache-{work.name}"
    counts = {"fork": args.count, "warm_pod": args.warm_count, "cold": args.cold_count}
    try:
        results = [
            measure(path, model, counts[path], args.count, work, cache_dir, args.timeout)
            for path in paths
        ]
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    report(results, args.count)
    if args.plot:
        plot(results, args.count, Path(args.plot))
        print(f"\nplot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def random_model(root: Path) -> Path:
    from dataplane.modelstore import create_random

    dest = root / "smollm2-135m-random"
    if not (dest / "config.json").exists():
        create_random(dest, "smollm2-135m", seed=0)
    return dest


if __name__ == "__main__":
    sys.exit(main())
