"""The FlowServe instance server as a real process, and a closed-loop streaming client for it."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
from bench_runs import BenchError, Run, Trace, hit_rate, warmup_prompt
from pydantic import TypeAdapter
from workload import WorkItem

from controlplane.wire import GenerateDelta, GenerateDone, GenerateError, GenerateEvent

ROOT = Path(__file__).resolve().parent.parent
HIT_METRICS = ("flowserve:prefix_cache_hits_total", "flowserve:prefix_cache_queries_total")
EVENTS: TypeAdapter[GenerateEvent] = TypeAdapter(GenerateEvent)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def flowserve_server(model: str, options: list[str], log: Path) -> Iterator[str]:
    """`python -m dataplane.flowserve --model MODEL *options` on a free loopback port, healthy,
    until the block exits; its output goes to `log`."""
    port = free_port()
    cmd = [sys.executable, "-m", "dataplane.flowserve", "--model", model, "--port", str(port)]
    cmd += [*options, "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, proc, log)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the server exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).json().get("status") == "ok":
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise BenchError(f"the server was not healthy after {timeout:.0f} s")


def server_prefix_counts(url: str) -> tuple[float, float] | None:
    return parse_prefix_counts(httpx.get(url + "/metrics", timeout=10).text)


def parse_prefix_counts(text: str) -> tuple[float, float] | None:
    """(hits, queries) summed over label sets from Prometheus text; None when either is absent."""
    totals = dict.fromkeys(HIT_METRICS, 0.0)
    seen = set()
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
            seen.add(name)
    if len(seen) < len(HIT_METRICS):
        return None
    return totals[HIT_METRICS[0]], totals[HIT_METRICS[1]]


async def stream_one(
    client: httpx.AsyncClient,
    url: str,
    request_id: str,
    item: WorkItem,
    first_token: asyncio.Event | None = None,
) -> Trace:
    body = {
        "request_id": request_id,
        "prompt_token_ids": list(item.prompt_token_ids),
        "sampling": {"max_tokens": item.max_tokens, "temperature": 0.0, "ignore_eos": True},
    }
    trace = Trace(time.perf_counter())
    async with client.stream("POST", url + "/generate", json=body) as response:
        if response.status_code != 200:
            raise BenchError(
                f"{request_id}: HTTP {response.status_code}: {await response.aread()!r}"
            )
        async for line in response.aiter_lines():
            if not line.strip():
                continue
            event = EVENTS.validate_json(line)
            if isinstance(event, GenerateDelta) and event.token_ids:
                now = time.perf_counter()
                k = len(event.token_ids)
                prev = trace.token_times[-1] if trace.token_times else now
                trace.token_times.extend(prev + (now - prev) * j / k for j in range(1, k + 1))
                if first_token is not None:
                    first_token.set()
            elif isinstance(event, GenerateError):
                raise BenchError(f"{request_id}: {event.message}")
            elif isinstance(event, GenerateDone) and event.completion_tokens != item.max_tokens:
                raise BenchError(
                    f"{request_id}: {event.completion_tokens} tokens, not {item.max_tokens}"
                )
    return trace


async def closed_loop(
    url: str, items: list[WorkItem], concurrency: int, tag: str, *, ramp_up: bool = False
) -> Run:
    """`concurrency` workers; each sends the next request as soon as its previous one is done.

    With `ramp_up`, worker k+1 starts once worker k's first request has its first token, so the
    run reaches `concurrency` in flight without the first `concurrency` prompts all arriving in
    the same instant (a burst no steady load produces); otherwise all start at once."""
    next_index = iter(range(len(items)))
    traces: list[Trace] = []
    failures = 0
    limits = httpx.Limits(max_connections=concurrency + 4)

    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        started = [asyncio.Event() for _ in range(concurrency + 1)]
        started[0].set()

        async def worker(k: int) -> None:
            nonlocal failures
            if ramp_up:
                await started[k].wait()
            first_token: asyncio.Event | None = started[k + 1]
            for i in next_index:
                try:
                    trace = await stream_one(client, url, f"{tag}-{i}", items[i], first_token)
                    traces.append(trace)
                except (BenchError, httpx.HTTPError) as exc:
                    failures += 1
                    print(f"  request failed: {exc}", file=sys.stderr)
                finally:
                    if first_token is not None:
                        first_token.set()  # a failed first request must not hold the others
                        first_token = None
            if first_token is not None:
                first_token.set()  # no request was left for this worker

        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        wall = time.perf_counter() - start
    return Run(f"flowserve-server@{concurrency}", traces, wall, failures=failures)


def run_server(
    model: str,
    options: list[str],
    items: list[WorkItem],
    concurrency_levels: list[int],
    log: Path,
    *,
    reuse: bool = False,
    ramp_up: bool = False,
    on_run: Callable[[Run], None] = lambda run: None,
) -> list[Run]:
    """One run per concurrency level. By default each level gets a fresh server, so that each
    starts with a cold prefix cache, as the offline run does; `reuse` keeps one server (faster,
    but later levels find the prompts of earlier ones in the cache)."""
    runs = []
    with ExitStack() as stack:
        url = None
        for concurrency in concurrency_levels:
            if url is None or not reuse:
                stack.close()
                url = stack.enter_context(flowserve_server(model, options, log))
                asyncio.run(closed_loop(url, [warmup_prompt(items)], 1, "warmup"))
            before = server_prefix_counts(url)
            tag = f"c{concurrency}"
            run = asyncio.run(closed_loop(url, items, concurrency, tag, ramp_up=ramp_up))
            run.prefix_hit_rate = hit_rate(before, server_prefix_counts(url))
            runs.append(run)
            on_run(run)
    return runs
