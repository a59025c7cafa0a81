"""Buffered, batched writing of request/job/task records, off the token path.

The request path holds each record it owns as a `Tracked` value, moves it with `Recorder.move`
(which checks the transition table at once) and goes on; a background task writes the queued
inserts and changes in one transaction per batch. `flush()` gives read-your-writes to the
management API, and `close()` drains the queue at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from controlplane.db import tables as t
from controlplane.db.store import StateChange, insert_created, write_changes
from controlplane.states import JobState, RequestState, TaskState, check_transition, is_terminal

log = logging.getLogger(__name__)

RecordState = RequestState | JobState | TaskState


@dataclass(slots=True)
class Tracked:
    """The request path's view of one record it owns."""

    kind: str  # "request" | "job" | "task"
    id: str
    state: RecordState

    @property
    def terminal(self) -> bool:
        return is_terminal(self.state)


@dataclass(slots=True, frozen=True)
class _Insert:
    rows: tuple[t.Base, ...]
    events: tuple[StateChange, ...]


class Recorder:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        clock: Callable[[], float],
        flush_interval_s: float = 0.05,
        batch_size: int = 256,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._interval = flush_interval_s
        self._batch_size = batch_size
        self._queue: list[_Insert | StateChange] = []
        self._wakeup = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.batches_written = 0

    def create(self, rows: list[t.Base], tracked: list[Tracked], reason: str) -> None:
        """Queue new rows; each tracked record gets its creation event."""
        now = self._clock()
        events = tuple(StateChange(r.kind, r.id, None, r.state.value, reason, now) for r in tracked)
        self._enqueue(_Insert(tuple(rows), events))

    def move(self, record: Tracked, target: RecordState, reason: str, **fields: Any) -> None:
        """The one way the request path changes a record's state."""
        if record.state == target:
            return
        check_transition(record.state, target)  # type: ignore[type-var]
        change = StateChange(
            record.kind, record.id, record.state.value, target.value, reason, self._clock(), fields
        )
        record.state = target
        self._enqueue(change)

    def _enqueue(self, item: _Insert | StateChange) -> None:
        self._queue.append(item)
        if len(self._queue) >= self._batch_size:
            self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="recorder")

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=self._interval)
            except TimeoutError:
                pass
            self._wakeup.clear()
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - the loop must survive a failed batch
                log.exception("writing records failed; will retry")
                await asyncio.sleep(self._interval * 10)

    async def flush(self) -> None:
        async with self._lock:
            if not self._queue:
                return
            batch, self._queue = self._queue, []
            try:
                await asyncio.to_thread(self._write, batch)
            except BaseException:
                self._queue = batch + self._queue  # keep order; nothing accepted is dropped
                raise
            self.batches_written += 1

    def _write(self, batch: list[_Insert | StateChange]) -> None:
        with self._sessions.begin() as session:
            for item in batch:
                if isinstance(item, _Insert):
                    insert_created(session, item.rows, item.events)
                else:
                    write_changes(session, [item])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.flush()
