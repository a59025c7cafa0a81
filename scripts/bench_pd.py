"""PD disaggregation on one node: colocated, disaggregated and auto deployments of the same total
instances, on the same seeded mixed workload, in one run of the real platform.

    python scripts/bench_pd.py                     # small preset, 40 requests at 2 and 5 req/s
    python scripts/bench_pd.py --preset tiny --num-requests 8 --rate 4 --json out.json

One control plane and one node agent (`--torch-threads 1`: every instance gets 1 torch thread;
deployments take no engine arguments) in a temporary DEEPFLOW_HOME, started as the end-to-end
tests start them; one random-weight model. For each mode in turn: deploy N instances in all
(colocated: N; disaggregated: N/2 prefill + N/2 decode; auto: N/2 colocated + N/4 prefill + N/4
decode), wait until every group is ready, send each instance one request directly (its first
forward pass is slower than the rest), run the workload at each rate, delete the deployment and
wait for its instances to stop. Auto is profiled first (`deepflow profile pd` on a coarse grid,
timed apart from the workload) so that its scheduler has a heatmap to route by.

Workload ("mixed"): `scripts/workload.py`'s seeded generator, two halves shuffled together:
prefill-heavy requests (prompts of 512-1024 tokens, 16 out) and decode-heavy ones (prompts of 64
tokens, 64-128 out); no shared prefixes, so the modes differ only in where prefill and decode
run. Poisson arrivals at each `--rate` (requests/s); every mode gets the same requests at the
same times. Requests go through the OpenAI API: `/v1/completions`, the prompt as token ids,
streamed, greedy, ignore_eos (each produces exactly its max_tokens).

Per request: TTFT = first streamed chunk - send; JCT = last chunk - send; TPOT = (JCT - TTFT) /
(output tokens - 1). Output tok/s = output tokens / (last answer - first send). Auto passes at a
rate when its throughput is at least (1 - tolerance) x the better fixed mode's and its JCT p50 at
most (1 + tolerance) x the better fixed mode's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from bench_runs import percentile
from workload import WorkItem, make_workload

from controlplane.wire import PDProfileInfo
from dataplane.modelstore import PRESETS, create_random

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 600.0
MODES = ("colocated", "disaggregated", "auto")
# Prompt and output lengths of the two halves (make_workload's lognormals, clipped to these).
KINDS: dict[str, dict[str, int]] = {
    "prefill-heavy": {"min_prompt": 512, "max_prompt": 1024, "min_out": 16, "max_out": 16},
    "decode-heavy": {"min_prompt": 64, "max_prompt": 64, "min_out": 64, "max_out": 128},
}
MAX_SILENT_STEPS = 16  # see speak_at_once
# The profile's grid, coarse enough for two cores: 8 probe shapes once the model's context cuts.
PROFILE_GRID = {
    "prompt_edges": [0, 128, 512, None],
    "ratio_edges": [0, 0.25, 1, None],
    "repeats": 2,
    "concurrency": 2,
}
Row = dict[str, Any]
Labelled = list[tuple[str, WorkItem]]  # (kind, request)
# Candidate requests -> each fixed so that its first output token streams at once, or None.
Fixer = Callable[[list[WorkItem]], list[WorkItem | None]]


# ------------------------------------------------------------------------------------------------
# Workload
# ------------------------------------------------------------------------------------------------


def mixed_workload(n: int, seed: int, vocab_size: int, avoid: list[int], fix: Fixer) -> Labelled:
    """Half prefill-heavy, half decode-heavy, shuffled (seeded)."""
    labelled: Labelled = []
    for offset, (kind, lengths) in enumerate(KINDS.items()):
        count = n // 2 if kind == "prefill-heavy" else n - n // 2
        candidates = make_workload(
            3 * count + 8,
            seed + offset,
            vocab_size,
            avoid_token_ids=avoid,
            shared_prefix_fraction=0.0,
            **lengths,
        )
        kept = [item for item in fix(candidates) if item is not None][:count]
        if len(kept) < count:
            raise RuntimeError(f"only {len(kept)} of {count} {kind} requests stream at once")
        labelled += [(kind, item) for item in kept]
    random.Random(seed).shuffle(labelled)
    return labelled


def poisson_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Arrival times (s from the start) of a Poisson process at `rate` per second."""
    rng = random.Random(f"{seed}:{rate}")
    offsets, t = [], 0.0
    for _ in range(n):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


def speak_at_once(model: Path, tokenizer: Any) -> Fixer:
    """A random model's token often turns into no text (an id past its small tokenizer's, half a
    UTF-8 character), and FlowServe holds such tokens back until text comes, so a stream's first
    chunk may come many tokens after its first token. Each prompt is run greedily here and
    extended by the tokens the model makes before its first one with text; the platform, greedy
    too, then streams the first token as soon as it is made. A prompt whose first
    MAX_SILENT_STEPS tokens make no text is left out."""
    from dataplane.flowserve.config import EngineConfig
    from dataplane.flowserve.detokenizer import Detokenizer
    from dataplane.flowserve.engine import Engine
    from dataplane.flowserve.sampling_params import SamplingParams

    def first_with_text(prompt: list[int], ids: list[int]) -> int | None:
        for k, token in enumerate(ids):
            if Detokenizer(tokenizer, prompt + ids[:k]).add(token).text:
                return k
        return None

    def fix(items: list[WorkItem]) -> list[WorkItem | None]:
        engine = Engine(EngineConfig(str(model), max_num_seqs=len(items)))
        params = SamplingParams(max_tokens=MAX_SILENT_STEPS, temperature=0, ignore_eos=True)
        for i, item in enumerate(items):
            engine.add_request(str(i), list(item.prompt_token_ids), params)
        made: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.new_token_id is not None:
                    made.setdefault(out.request_id, []).append(out.new_token_id)
        fixed: list[WorkItem | None] = []
        for i, item in enumerate(items):
            ids, prompt = made[str(i)], list(item.prompt_token_ids)
            k = first_with_text(prompt, ids)
            fixed.append(None if k is None else WorkItem(tuple(prompt + ids[:k]), item.max_tokens))
        return fixed

    return fix


def describe(labelled: Labelled) -> Row:
    def spread(values: list[int]) -> Row:
        return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}

    out: Row = {"num_requests": len(labelled)}
    for kind in KINDS:
        items = [i for k, i in labelled if k == kind]
        if items:
            out[kind] = {
                "n": len(items),
                "prompt_tokens": spread([len(i.prompt_token_ids) for i in items]),
                "output_tokens": spread([i.max_tokens for i in items]),
            }
    return out


# ------------------------------------------------------------------------------------------------
# The platform: control plane + one node agent, as tests/e2e/conftest.py starts them
# ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Platform:
    def __init__(self, home: Path) -> None:
        port = free_port()
        self.home = home
        self.url = f"http://127.0.0.1:{port}"
        self.env = {
            **os.environ,
            "DEEPFLOW_HOME": str(home),
            "DEEPFLOW_URL": self.url,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "DEEPFLOW_CACHE_DIR": str(home / "dram-cache"),
        }
        self.api = httpx.Client(base_url=self.url, timeout=60.0)
        agent = ["--control-plane", self.url, "--port", str(free_port()), "--name", "bench-node"]
        self.procs = [
            self._spawn(["controlplane", "--port", str(port)], "controlplane.log"),
            self._spawn(["dataplane.agent", *agent, "--torch-threads", "1"], "agent.log"),
        ]

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        path = self.home / "logs" / log
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", *args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_node(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if any(n["state"] == "ready" for n in self.call("GET", "/api/v1/status")["nodes"]):
                    return
            except (httpx.HTTPError, RuntimeError):
                pass
            time.sleep(0.3)
        raise RuntimeError("the platform did not start")

    def call(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
        reply = self.api.request(method, path, json=body, timeout=timeout)
        if reply.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {reply.status_code} {reply.text}")
        return reply.json()

    def logs(self) -> str:
        paths = sorted((self.home / "logs").rglob("*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in paths)

    def stop(self) -> None:
        self.api.close()
        for proc in reversed(self.procs):  # the agent first: it stops its instances
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def groups_for(mode: str, n: int) -> Row:
    if mode == "colocated":
        return {"replicas": n}
    if mode == "disaggregated":
        return {"prefill_replicas": n // 2, "decode_replicas": n - n // 2}
    pair = n // 2
    return {
        "replicas": n - pair,
        "prefill_replicas": pair // 2,
        "decode_replicas": pair - pair // 2,
    }


def deploy(platform: Platform, name: str, mode: str, n: int) -> list[Row]:
    """Deploy and wait until every group is at its count; returns the ready instances."""
    body = {"name": name, "model": "bench", "mode": mode} | groups_for(mode, n)
    platform.call("POST", "/api/v1/deployments", body)
    deadline = time.monotonic() + START_TIMEOUT_S
    info: Row = {}
    while time.monotonic() < deadline:
        info = platform.call("GET", f"/api/v1/deployments/{name}")
        if info["groups"] and all(g["ready_replicas"] == g["replicas"] for g in info["groups"]):
            return [i for i in info["instances"] if i["state"] == "ready"]
        time.sleep(0.5)
    raise RuntimeError(f"{name} not ready in {START_TIMEOUT_S} s: {info.get('groups')}")


def undeploy(platform: Platform, name: str) -> None:
    platform.call("DELETE", f"/api/v1/deployments/{name}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        listed = platform.call("GET", f"/api/v1/instances?deployment={name}")["data"]
        if all(i["state"] in ("stopped", "failed") for i in listed):
            return
        time.sleep(0.5)
    print(f"  {name}: instances still stopping after 60 s", file=sys.stderr)


def warm_up(instances: list[Row], prompt: list[int]) -> None:
    """One request straight to each instance: no record, no scheduler history."""
    for inst in instances:
        body = {
            "request_id": f"warmup-{inst['id']}",
            "prompt_token_ids": prompt,
            "sampling": {"max_tokens": 8, "temperature": 0, "ignore_eos": True},
        }
        with httpx.stream("POST", f"{inst['url']}/generate", json=body, timeout=120) as reply:
            reply.raise_for_status()
            for _ in reply.iter_lines():
                pass


# ------------------------------------------------------------------------------------------------
# The load generator
# ------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Trace:
    kind: str
    sent: float
    request_id: str | None = None
    first: float | None = None
    last: float | None = None
    output_tokens: int = 0
    first_chunk_tokens: int = 0  # 1 unless the engine held the first token back
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None or self.error else self.first - self.sent

    @property
    def jct(self) -> float | None:
        return None if self.last is None or self.error else self.last - self.sent

    @property
    def tpot(self) -> float | None:
        if self.first is None or self.last is None or self.error or self.output_tokens < 2:
            return None
        return (self.last - self.first) / (self.output_tokens - 1)


async def one_request(
    client: httpx.AsyncClient, deployment: str, kind: str, item: WorkItem, at: float
) -> Trace:
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    body = {
        "model": deployment,
        "prompt": list(item.prompt_token_ids),
        "max_tokens": item.max_tokens,
        "temperature": 0,
        "logprobs": 0,  # each chunk lists its tokens: says how many the first one carried
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    trace = Trace(kind, time.perf_counter())
    try:
        async with client.stream("POST", "/v1/completions", json=body) as reply:
            trace.request_id = reply.headers.get("x-request-id")
            if reply.status_code != 200:
                trace.error = f"{reply.status_code} {(await reply.aread()).decode()[:200]}"
                return trace
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    trace.error = chunk["error"]["message"]
                elif chunk["choices"]:
                    trace.last = time.perf_counter()
                    if trace.first is None:
                        trace.first = trace.last
                        logprobs = chunk["choices"][0]["logprobs"] or {"tokens": []}
                        trace.first_chunk_tokens = len(logprobs["tokens"])
                elif chunk.get("usage"):
                    trace.output_tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        trace.error = repr(exc)
    return trace


async def run_workload(
    url: str, deployment: str, labelled: Labelled, offsets: list[float]
) -> list[Trace]:
    limits = httpx.Limits(max_connections=len(labelled) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as c:
        t0 = time.perf_counter()
        sends = [
            one_request(c, deployment, kind, item, t0 + offset)
            for (kind, item), offset in zip(labelled, offsets, strict=True)
        ]
        return list(await asyncio.gather(*sends))


def schedule_modes(platform: Platform, traces: list[Trace]) -> list[str | None]:
    """Each request's routing decision: its job's `schedule.mode` (None on a colocated
    deployment, which routes without the PD scheduler)."""
    modes: list[str | None] = []
    for trace in traces:
        jobs = platform.call("GET", f"/api/v1/requests/{trace.request_id}")["jobs"]
        schedule = jobs[0].get("schedule") if jobs and trace.request_id else None
        modes.append(schedule["mode"] if schedule else None)
    return modes


# ------------------------------------------------------------------------------------------------
# Summaries, the verdict and the tables (pure)
# ------------------------------------------------------------------------------------------------


def latency(traces: list[Trace]) -> Row:
    row: Row = {
        "requests": len(traces),
        "failures": sum(1 for t in traces if t.error),
        # Their first chunk carried more than the first token: their TTFT is too long.
        "late_first_chunks": sum(1 for t in traces if t.first_chunk_tokens > 1),
    }
    for name in ("ttft", "tpot", "jct"):
        values = [v for t in traces if (v := getattr(t, name)) is not None]
        row[f"{name}_p50_s"] = percentile(values, 50)
        row[f"{name}_p99_s"] = percentile(values, 99)
    return row


def summarize(traces: list[Trace], scheduled: list[str | None]) -> Row:
    ends = [t.last for t in traces if t.last is not None]
    wall = max(ends) - min(t.sent for t in traces) if ends else 0.0
    tokens = sum(t.output_tokens for t in traces if not t.error)
    known = [m for m in scheduled if m is not None]
    share = sum(1 for m in known if m == "disaggregated") / len(known) if known else None
    kinds = sorted({t.kind for t in traces})
    return {
        **latency(traces),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_s": tokens / wall if wall > 0 else 0.0,
        "disaggregated_share": share,
        "by_kind": {k: latency([t for t in traces if t.kind == k]) for k in kinds},
    }


def verdict(rows: list[Row], rate: float, tolerance: float) -> Row:
    """Auto against the better fixed mode at one rate, per figure: the higher throughput, the
    lower JCT p50."""
    by_mode = {r["mode"]: r for r in rows if r["rate"] == rate}
    auto, fixed = by_mode["auto"], [by_mode["colocated"], by_mode["disaggregated"]]
    best_tput = max(fixed, key=lambda r: r["output_tok_s"])
    best_jct = min(fixed, key=lambda r: r["jct_p50_s"] or float("inf"))
    tput_ratio = auto["output_tok_s"] / best_tput["output_tok_s"]
    jct_ratio = (auto["jct_p50_s"] or float("inf")) / (best_jct["jct_p50_s"] or float("inf"))
    passed = tput_ratio >= 1 - tolerance and jct_ratio <= 1 + tolerance
    return {
        "rate": rate,
        "tolerance": tolerance,
        "best_throughput_mode": best_tput["mode"],
        "throughput_ratio": tput_ratio,
        "best_jct_p50_mode": best_jct["mode"],
        "jct_p50_ratio": jct_ratio,
        "passed": passed and not auto["failures"],
    }


def render(result: Row) -> str:
    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    def pair(row: Row, name: str, fmt: Callable[[float | None], str]) -> str:
        return f"{fmt(row[f'{name}_p50_s'])} / {fmt(row[f'{name}_p99_s'])}"

    lines = [
        "| mode | groups | rate (req/s) | requests | output tok/s | TTFT p50 / p99 (s) "
        "| TPOT p50 / p99 (ms) | JCT p50 / p99 (s) | sent disaggregated |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        share = "-" if r["disaggregated_share"] is None else f"{r['disaggregated_share']:.0%}"
        notes = f" ({r['failures']} failed)" if r["failures"] else ""
        if r["late_first_chunks"]:
            notes += f" ({r['late_first_chunks']} first chunks late)"
        lines.append(
            f"| {r['mode']} | {r['groups']} | {r['rate']:g} | {r['requests']}{notes} "
            f"| {r['output_tok_s']:.1f} | {pair(r, 'ttft', s)} | {pair(r, 'tpot', ms)} "
            f"| {pair(r, 'jct', s)} | {share} |"
        )
    lines += [
        "",
        "| mode | rate | requests | TTFT p50 (s) | TPOT p50 / p99 (ms) | JCT p50 / p99 (s) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in result["runs"]:
        for kind, k in r["by_kind"].items():
            lines.append(
                f"| {r['mode']} | {r['rate']:g} | {k['requests']} {kind} "
                f"| {s(k['ttft_p50_s'])} | {pair(k, 'tpot', ms)} | {pair(k, 'jct', s)} |"
            )
    if result["verdicts"]:
        lines.append("")
    for v in result["verdicts"]:
        lines.append(
            f"rate {v['rate']:g}: auto / better fixed throughput ({v['best_throughput_mode']}) "
            f"{v['throughput_ratio']:.2f}x, auto / better fixed JCT p50 "
            f"({v['best_jct_p50_mode']}) {v['jct_p50_ratio']:.2f}x: auto no worse than the "
            f"better fixed mode (within {v['tolerance']:.0%}): {'PASS' if v['passed'] else 'FAIL'}"
        )
    if result["profile"] is not None:
        p = result["profile"]
        lines.append(
            f"auto's PD profile (outside its figures): {p['wall_s']:.1f} s, "
            f"{p['num_measurements']} requests"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def git(*cmd: str) -> str:
    return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def profile(platform: Platform, name: str, max_total_tokens: int) -> Row:
    grid = PROFILE_GRID | {"max_total_tokens": max_total_tokens}
    started = time.perf_counter()
    raw = platform.call("POST", f"/api/v1/deployments/{name}/pd-profile", grid, timeout=3600)
    wall = time.perf_counter() - started
    info = PDProfileInfo.model_validate(raw)
    from deepflow_cli.commands.profile import show

    show(info)  # the heatmap, on stdout
    return {"wall_s": wall, "num_measurements": info.num_measurements, "heatmap": info.heatmap}


def bench_mode(
    platform: Platform, args: argparse.Namespace, mode: str, labelled: Labelled, result: Row
) -> list[Row]:
    name = f"pd-{mode}"
    started = time.perf_counter()
    instances = deploy(platform, name, mode, args.instances)
    roles = [i["role"] for i in instances]
    counts = [(roles.count(r), r) for r in ("colocated", "prefill", "decode")]
    groups = ", ".join(f"{n} {role}" for n, role in counts if n)
    print(f"{mode}: {groups} ready in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    warm_up(instances, list(labelled[0][1].prompt_token_ids[:64]))
    if mode == "auto":
        context = PRESETS[args.preset].max_position_embeddings
        result["profile"] = profile(platform, name, context)
    rows = []
    for rate in args.rate:
        offsets = poisson_offsets(len(labelled), rate, args.seed)
        traces = asyncio.run(run_workload(platform.url, name, labelled, offsets))
        row = summarize(traces, schedule_modes(platform, traces))
        rows.append({"mode": mode, "groups": groups, "rate": rate} | row)
        print(f"{mode} @ {rate:g}/s: {row['output_tok_s']:.1f} tok/s", file=sys.stderr)
    undeploy(platform, name)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-requests", type=int, default=40, help="per mode and rate")
    p.add_argument("--rate", type=float, nargs="+", default=[2.0, 5.0], help="requests/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--instances", type=int, default=4, help="in each mode, all groups together")
    p.add_argument("--tolerance", type=float, default=0.10, help="auto vs the better fixed mode")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.instances < (4 if "auto" in args.modes else 2):
        p.error("--instances: at least 2, and 4 with auto (a colocated group and a pair)")
    if args.num_requests < 2 or min(args.rate) <= 0:
        p.error("--num-requests must be at least 2 and every --rate positive")

    from transformers import AutoTokenizer

    commit = git("rev-parse", "--short", "HEAD")
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"  # tracked files differed from that commit
    result: Row = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "cpu_count": os.cpu_count(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "profile": None,
        "verdicts": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-pd-") as tmp:
        home = Path(tmp)
        model = create_random(home / "models" / args.preset, args.preset, seed=args.seed)
        tokenizer = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
        vocab = min(len(tokenizer), PRESETS[args.preset].vocab_size)
        avoid = list(tokenizer.all_special_ids)
        fix = speak_at_once(model, tokenizer)
        labelled = mixed_workload(args.num_requests, args.seed, vocab, avoid, fix)
        gc.collect()  # the greedy pass's engine and its KV cache
        result["workload"] = describe(labelled)
        platform = Platform(home)
        try:
            platform.wait_node()
            platform.call("POST", "/api/v1/models", {"name": "bench", "path": str(model)})
            runs = []
            for mode in args.modes:
                runs += bench_mode(platform, args, mode, labelled, result)
        except (RuntimeError, httpx.HTTPError) as exc:
            print(f"bench_pd: {exc}\n{platform.logs()}", file=sys.stderr)
            return 1
        finally:
            platform.stop()
    result["runs"] = runs
    if set(MODES) <= set(args.modes):
        result["verdicts"] = [verdict(runs, rate, args.tolerance) for rate in args.rate]
    print(render(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
