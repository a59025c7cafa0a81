"""The four systems `bench_semipd.py` compares, each behind `submit()`, driven by open-loop
arrivals in one process on one device:

    colocated       one Engine with chunked prefill (prefill chunks and decodes in one batch)
    disaggregated   a prefill Engine and a decode Engine, each with its own weights and K/V pool,
                    each on its own half of the device (a compute partition: SMs on a GPU,
                    threads on a host), the prompt's K/V handed over through device memory
    semi-pd static  one SemiPDEngine, the split fixed
    semi-pd dynamic one SemiPDEngine whose SLO controller moves the split

Every engine is owned by one `EngineLoop` thread (engines are not thread-safe); a request's
tokens are stamped when `step()` returns them to that thread.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dataplane.flowserve.engine import Engine, StepOutput
from dataplane.flowserve.platform import ComputePartition, GreenPartition
from dataplane.flowserve.sampling_params import SamplingParams
from dataplane.flowserve.semipd.split import split_units

OnOutput = Callable[[StepOutput, float], None]


@dataclass(slots=True)
class Trace:
    """One request as a client sees it: when it was sent, when each token came."""

    arrival: float
    max_tokens: int
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.token_times) >= self.max_tokens


@dataclass(frozen=True, slots=True)
class _Post:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    kwargs: dict[str, Any]


class EngineLoop:
    """A thread that owns `engine`: adds what was posted, steps while anything is unfinished,
    hands every output to `on_output` with the time `step()` returned it. With a `partition`,
    the thread binds it once and runs every iteration inside it."""

    def __init__(
        self, engine: Engine, on_output: OnOutput, partition: ComputePartition | None = None
    ) -> None:
        self.engine = engine
        self._on_output = on_output
        self._partition = partition
        self._inbox: deque[_Post] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._aborting = False
        self._live: set[str] = set()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bench-engine", daemon=True)
        self._thread.start()

    def post(self, request_id: str, prompt: list[int], params: SamplingParams, **kw: Any) -> None:
        with self._cond:
            self._inbox.append(_Post(request_id, prompt, params, kw))
            self._cond.notify()

    def stop(self) -> None:
        """Abort whatever is still running, then end the thread."""
        with self._cond:
            self._stopping = self._aborting = True
            self._cond.notify()
        self._thread.join(30)

    def _run(self) -> None:
        try:
            if self._partition is not None:
                self._partition.bind(None)
            while True:
                with self._cond:
                    if not self._inbox and not self.engine.has_unfinished():
                        if self._stopping:
                            return
                        self._cond.wait(0.001)
                    posts = list(self._inbox)
                    self._inbox.clear()
                    aborting = self._aborting
                if aborting:
                    posts = []
                    for request_id in self._live:
                        self.engine.abort_request(request_id)
                    self._live.clear()
                self._iterate(posts)
        except BaseException as exc:  # reported by the sweep, which stops waiting
            self.error = exc

    def _iterate(self, posts: list[_Post]) -> None:
        if self._partition is None:
            self._step(posts)
        else:
            with self._partition.active():
                self._step(posts)

    def _step(self, posts: list[_Post]) -> None:
        for p in posts:
            self.engine.add_request(p.request_id, p.prompt_token_ids, p.params, **p.kwargs)
            self._live.add(p.request_id)
        if not self.engine.has_unfinished():
            return
        outputs = self.engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.finished:
                self._live.discard(out.request_id)
            if not self._aborting:
                self._on_output(out, now)


class System(ABC):
    """A system under test: `submit` sends a request, `traces` collects what came back. Only
    the sweep's thread adds traces; the engine threads append to a trace's lists."""

    name: str

    def __init__(self) -> None:
        self.traces: dict[str, Trace] = {}

    @abstractmethod
    def submit(self, request_id: str, prompt: list[int], max_tokens: int) -> None: ...

    @abstractmethod
    def errors(self) -> list[BaseException]: ...

    @abstractmethod
    def close(self) -> None: ...

    def describe(self) -> dict[str, Any]:
        return {}

    def diagnose(self) -> dict[str, Any]:
        """What the engines hold (for a point that timed out)."""
        return {}

    def _trace(self, request_id: str, max_tokens: int) -> None:
        self.traces[request_id] = Trace(time.perf_counter(), max_tokens)

    def _token(self, request_id: str, now: float, token_id: int) -> None:
        trace = self.traces[request_id]
        trace.token_times.append(now)
        trace.token_ids.append(token_id)


def engine_state(engine: Engine) -> dict[str, Any]:
    stats = engine.stats()
    return {
        "running": stats.num_requests_running,
        "waiting": stats.num_requests_waiting,
        "kv_cache_usage": stats.kv_cache_usage_perc,
        "unfinished": engine.has_unfinished(),
    }


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


class SingleEngine(System):
    """Colocated and semi-PD: one engine behind one loop."""

    def __init__(self, name: str, engine: Engine) -> None:
        super().__init__()
        self.name = name
        self.engine = engine
        self.loop = EngineLoop(engine, self._output)

    def submit(self, request_id: str, prompt: list[int], max_tokens: int) -> None:
        self._trace(request_id, max_tokens)
        self.loop.post(request_id, prompt, greedy(max_tokens))

    def _output(self, out: StepOutput, now: float) -> None:
        if out.new_token_id is not None:
            self._token(out.request_id, now, out.new_token_id)

    def errors(self) -> list[BaseException]:
        return [self.loop.error] if self.loop.error is not None else []

    def diagnose(self) -> dict[str, Any]:
        return {"engine": engine_state(self.engine)}

    def describe(self) -> dict[str, Any]:
        report = getattr(self.engine, "report", None)
        if report is None:
            return {}
        r = report()
        return {
            "prefill_share": r.prefill_share,
            "prefill_units": r.prefill_units,
            "decode_units": r.decode_units,
            "num_switches": r.num_switches,
        }

    def close(self) -> None:
        self.loop.stop()
        self.engine.close()


class Disaggregated(System):
    """A prefill engine and a decode engine on disjoint halves of the device. The prefill side
    runs each prompt prefill-only (one token, its K/V left on the device); the decode side
    imports the K/V into its own pool and goes on. The first token is the client's when the
    prefill side returns it."""

    name = "disaggregated"

    def __init__(self, prefill: Engine, decode: Engine, prefill_share: int = 50) -> None:
        super().__init__()
        platform = prefill.platform
        split = split_units(
            platform.num_compute_units(), platform.partition_granularity, prefill_share
        )
        self.split = split
        parts = platform.compute_partitions([split.prefill_units, split.decode_units])
        # The K/V are allocated on the prefill side's stream and read on the decode side's.
        self._decode_stream = parts[1].stream if isinstance(parts[1], GreenPartition) else None
        self._params: dict[str, tuple[list[int], int]] = {}
        self.num_handed_over = 0
        self.prefill = EngineLoop(prefill, self._prefilled, parts[0])
        self.decode = EngineLoop(decode, self._decoded, parts[1])

    def submit(self, request_id: str, prompt: list[int], max_tokens: int) -> None:
        self._trace(request_id, max_tokens)
        self._params[request_id] = (prompt, max_tokens)
        self.prefill.post(request_id, prompt, greedy(1), prefill_only=True, export_on_device=True)

    def _prefilled(self, out: StepOutput, now: float) -> None:
        if out.new_token_id is None or out.request_id not in self._params:
            return
        self._token(out.request_id, now, out.new_token_id)
        prompt, max_tokens = self._params.pop(out.request_id)
        if max_tokens > 1:
            if out.kv is None:
                raise RuntimeError(f"prefill of {out.request_id} exported no K/V")
            if self._decode_stream is not None:
                out.kv.kv.record_stream(self._decode_stream)
            self.num_handed_over += 1
            self.decode.post(out.request_id, prompt, greedy(max_tokens), imported=out.kv)

    def _decoded(self, out: StepOutput, now: float) -> None:
        # The imported sequence's first output is the token that came with its K/V.
        if out.new_token_id is not None and out.kv_import_s is None:
            self._token(out.request_id, now, out.new_token_id)

    def errors(self) -> list[BaseException]:
        return [e for e in (self.prefill.error, self.decode.error) if e is not None]

    def describe(self) -> dict[str, Any]:
        return {"prefill_units": self.split.prefill_units, "decode_units": self.split.decode_units}

    def diagnose(self) -> dict[str, Any]:
        return {
            "prefill": engine_state(self.prefill.engine),
            "decode": engine_state(self.decode.engine),
            "handed_over": self.num_handed_over,
            "awaiting_prefill": len(self._params),
        }

    def close(self) -> None:
        self.prefill.stop()
        self.decode.stop()
        self.prefill.engine.close()
        self.decode.engine.close()
