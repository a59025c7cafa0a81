"""The one thread that drives the engine.

Request handlers never touch the engine: they `submit` a `RequestStream` with a `sink` (a callable
that takes events, called on this thread) and `abort` by request id. Commands travel on a
thread-safe queue; the thread blocks on it while the engine is idle and drains it between steps.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from controlplane.wire import GenerateDelta, GenerateDone, GenerateError
from dataplane.flowserve.engine import Engine, EngineStats
from dataplane.flowserve.errors import InvalidRequest
from dataplane.flowserve.metrics import Metrics
from dataplane.flowserve.stream import KVExported, RequestStream

log = logging.getLogger(__name__)

# KVExported never reaches the wire: the server turns it into a GenerateDone with a KVHandle.
Event = GenerateDelta | GenerateDone | GenerateError | KVExported
Sink = Callable[[Event], None]


@dataclass(frozen=True, slots=True)
class _Submit:
    stream: RequestStream
    sink: Sink


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class _Stop:
    pass


_Command = _Submit | _Abort | _Stop


@dataclass(slots=True)
class _Active:
    stream: RequestStream
    sink: Sink
    arrived: float = 0.0  # time.monotonic() when the engine thread took it
    first_token_at: float | None = None
    last_token_at: dict[int, float] = field(default_factory=dict)  # per choice index


class EngineDriver:
    def __init__(self, engine: Engine, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self._metrics = metrics
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._requests: dict[str, _Active] = {}
        self._sequences: dict[str, tuple[_Active, int]] = {}
        self._thread = threading.Thread(target=self._run, name="flowserve-engine", daemon=True)
        # Snapshots for other threads (health, metrics); written only by the engine thread.
        self.num_running = 0
        self.num_waiting = 0
        self.stats: EngineStats | None = None

    # -- any thread ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what is in flight (each stream gets an error event) and join the thread."""
        if self._thread.is_alive():
            self._commands.put(_Stop())
            self._thread.join(timeout)

    def submit(self, stream: RequestStream, sink: Sink) -> None:
        self._commands.put(_Submit(stream, sink))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            idle = not self.engine.has_unfinished()
            commands = [self._commands.get()] if idle else []
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for command in commands:
                if isinstance(command, _Stop):
                    self._fail_all("the instance is shutting down", "shutdown")
                    return
                if isinstance(command, _Submit):
                    self._add(command.stream, command.sink)
                else:
                    self._abort(command.request_id)
            if self.engine.has_unfinished():
                self._step()
            self.stats = self.engine.stats()
            self.num_running = self.stats.num_requests_running
            self.num_waiting = self.stats.num_requests_waiting

    def _add(self, stream: RequestStream, sink: Sink) -> None:
        if stream.request_id in self._requests:
            _send(
                sink,
                GenerateError(message="request id already in flight", code="duplicate_request_id"),
            )
            return
        active = _Active(stream, sink, arrived=time.monotonic())
        added: list[str] = []
        imported = stream.take_imported()
        try:
            for index, (seq_id, params) in enumerate(
                zip(stream.sequence_ids, stream.params, strict=True)
            ):
                if stream.prefill_only or imported is not None:
                    self.engine.add_request(
                        seq_id,
                        stream.prompt_token_ids,
                        params,
                        prefill_only=stream.prefill_only,
                        imported=imported,
                        export_on_device=stream.export_on_device,
                    )
                else:  # a plain request: the interface's three-argument form
                    self.engine.add_request(seq_id, stream.prompt_token_ids, params)
                added.append(seq_id)
                self._sequences[seq_id] = (active, index)
        except InvalidRequest as exc:
            for seq_id in added:
                self.engine.abort_request(seq_id)
                del self._sequences[seq_id]
            _send(sink, GenerateError(message=exc.message, code=exc.code))
            return
        self._requests[stream.request_id] = active
        if self._metrics is not None:
            self._metrics.prompt_tokens.inc(len(stream.prompt_token_ids))

    def _abort(self, request_id: str) -> None:
        active = self._requests.get(request_id)
        if active is not None:
            for seq_id in active.stream.unfinished_sequence_ids():
                self.engine.abort_request(seq_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:  # a broken step must not take the thread (and the instance) down
            log.exception("engine step failed")
            self._fail_all("the engine failed while generating", "engine_error")
            return
        for out in outputs:
            found = self._sequences.get(out.request_id)
            if found is None:
                continue  # an abort reported after its request already finished
            active, index = found
            if out.new_token_id is not None and self._metrics is not None:
                self._observe_token(active, index)
            events = active.stream.on_output(index, out)
            if events.abort_sequence is not None:
                self.engine.abort_request(events.abort_sequence)
            if events.delta is not None:
                _send(active.sink, events.delta)
                reason = events.delta.finish_reason
                if reason is not None:
                    del self._sequences[out.request_id]
                    if reason != "abort" and self._metrics is not None:
                        self._metrics.record_finish(reason)
            if active.stream.finished:
                for seq_id in active.stream.sequence_ids:  # a prefill-only one sent no delta
                    self._sequences.pop(seq_id, None)
                del self._requests[active.stream.request_id]
                _send(active.sink, active.stream.done())
                if self._metrics is not None and active.first_token_at is not None:
                    self._metrics.e2e_request_latency.observe(time.monotonic() - active.arrived)

    def _observe_token(self, active: _Active, index: int) -> None:
        assert self._metrics is not None
        now = time.monotonic()
        self._metrics.generation_tokens.inc()
        if active.first_token_at is None:
            active.first_token_at = now
            self._metrics.time_to_first_token.observe(now - active.arrived)
        previous = active.last_token_at.get(index)
        if previous is not None:
            self._metrics.inter_token_latency.observe(now - previous)
        active.last_token_at[index] = now

    def _fail_all(self, message: str, code: str) -> None:
        for active in self._requests.values():
            for seq_id in active.stream.unfinished_sequence_ids():
                self.engine.abort_request(seq_id)
            _send(active.sink, GenerateError(message=message, code=code))
        self._requests.clear()
        self._sequences.clear()


def _send(sink: Sink, event: Event) -> None:
    try:
        sink(event)
    except RuntimeError:  # the receiving event loop is closed: nobody is listening any more
        log.debug("dropped an event for a closed stream")
