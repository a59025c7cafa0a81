"""A semi-PD instance behind the engine's interface: two workers, one store.

`SemiPDEngine` loads what `Engine` loads (tokenizer, one copy of the weights, one paged KV pool
and its block manager, the decode graphs) and runs a `PrefillWorker` and a `DecodeWorker` over
them, each a thread on its own compute partition (worker.py). The engine's own thread (the
server's driver) keeps the interface it has with `Engine`:

    add_request(...)   validated here, then handed to the prefill worker's inbox
    abort_request(id)  reported by the next step(); the worker holding it frees it
    step()             the outputs the workers produced since the last call (waiting up to
                       OUTPUT_WAIT_S for one), and the SLO controller's tick
    has_unfinished()

so the driver, the server and the /generate protocol are those of a colocated instance.

The split: the prefill worker gets `prefill_share` percent of the device's compute units
(split.py); `set_split` builds both partitions (cached per split) and each worker moves to its
own at its next iteration boundary, without waiting for the other: nothing is drained or
stalled. With SLOs configured, `SLOController` (controller.py) decides the split every window
from the workers' TTFT and inter-token samples; `--semi-pd-static` only observes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.engine import Engine, EngineStats, StepOutput
from dataplane.flowserve.errors import ConfigError
from dataplane.flowserve.models import ModelConfig
from dataplane.flowserve.platform import ComputePartition
from dataplane.flowserve.scheduler import Scheduler
from dataplane.flowserve.semipd.controller import (
    MAX_SHARE,
    MIN_SHARE,
    ControllerConfig,
    SLOController,
    SwitchRecord,
)
from dataplane.flowserve.semipd.ledger import Ledger, Timing
from dataplane.flowserve.semipd.split import Split, split_units
from dataplane.flowserve.semipd.worker import DecodeWorker, PrefillWorker
from dataplane.flowserve.sequence import Sequence

# How long step() waits for an output when it has nothing to return: it bounds how late a new
# request reaches the prefill worker while the driver waits here.
OUTPUT_WAIT_S = 0.002


class SemiPDError(RuntimeError):
    """A worker's step failed; the requests it held were freed."""


@dataclass(frozen=True, slots=True)
class SemiPDReport:
    """What /semipd shows: the split, where each worker runs, the controller's view."""

    prefill_share: int
    prefill_units: int
    decode_units: int
    total_units: int
    static: bool
    slo_ttft_s: float | None
    slo_tpot_s: float | None
    prefill_running: int
    prefill_waiting: int
    decode_running: int
    num_switches: int  # the controller's (or set_split's) split changes
    last_window: dict[str, Any] | None
    last_decision: dict[str, Any] | None
    records: list[dict[str, Any]]
    # The newest P90s a window measured (None until one has): what the gauges export.
    ttft_p90_s: float | None = None
    tpot_p90_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SemiPDEngine(Engine):
    def __init__(
        self, config: EngineConfig, *, weights: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        if not config.semi_pd:
            raise ConfigError("SemiPDEngine needs a semi-PD configuration (semi_pd=True)")
        super().__init__(config, weights=weights)
        self._ledger = Ledger()
        self.controller = _controller(config, time.monotonic())
        self._records: list[SwitchRecord] = []  # the controller's switches
        self._num_switches = 0  # the controller's and set_split's
        self.total_units = config.semi_pd_units or self.platform.num_compute_units()
        self._partitions: dict[tuple[int, int], list[ComputePartition]] = {}
        self.split = split_units(
            self.total_units, self.platform.partition_granularity, config.semi_pd_split
        )
        prefill_part, decode_part = self._partitions_for(self.split)
        # The base engine's scheduler admits requests; the decode worker adopts what it hands
        # over. The base runner, with the decode graphs, is the decode worker's.
        decode_scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
        )
        self.prefill = PrefillWorker(
            self._scheduler,
            self._runner.sibling(),
            ledger=self._ledger,
            platform=self.platform,
            partition=prefill_part,
            finish_reason=self._finish_reason,
            controller=self.controller,
            max_num_seqs=config.max_num_seqs,
        )
        self.decode = DecodeWorker(
            decode_scheduler,
            self._runner,
            ledger=self._ledger,
            platform=self.platform,
            partition=decode_part,
            finish_reason=self._finish_reason,
            controller=self.controller,
            max_num_seqs=config.max_num_seqs,
        )
        self.prefill.peer, self.decode.peer = self.decode, self.prefill
        self.prefill.start()
        self.decode.start()

    def _activation_bytes(self, model_config: ModelConfig, dtype: torch.dtype) -> int:
        """Both workers' activations live at once: a full prefill step's and a decode step's
        of max_num_seqs sequences."""
        prefill = super()._activation_bytes(model_config, dtype)
        return prefill + self._runner.profile_activations(self.config.max_num_seqs)

    # --- the engine's interface (the driver's thread) -----------------------------------------

    @property
    def num_running(self) -> int:
        return self.prefill.num_running + self.decode.num_running

    @property
    def num_waiting(self) -> int:
        return self.prefill.num_waiting + self.decode.num_waiting

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_requests_running=self.num_running,
            num_requests_waiting=self.num_waiting,
            kv_cache_usage_perc=bm.usage,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            num_preemptions=self.prefill.num_preemptions + self.decode.num_preemptions,
        )

    def has_unfinished(self) -> bool:
        # A live sequence stays in _sequences until its last output is collected; what else
        # the ledger may hold belongs to aborted ones (dropped by the next step).
        return bool(self._sequences or self._reported)

    def _queue(self, seq: Sequence) -> None:
        self._scheduler.check(seq)  # raises here, on the caller's thread
        self._sequences[seq.request_id] = seq
        self.prefill.post(seq, Timing(time.monotonic()), new=True)

    def abort_request(self, request_id: str) -> None:
        seq = self._sequences.pop(request_id, None)
        if seq is None:
            return
        self._ledger.abort(seq)
        self.prefill.nudge()
        self.decode.nudge()
        self._reported.append(StepOutput(request_id, None, None, True, "abort"))

    def step(self) -> list[StepOutput]:
        failure = self._ledger.take_failure()
        if failure is not None:
            raise SemiPDError(f"a semi-PD worker failed: {failure}") from failure
        outputs, self._reported = self._reported, []
        for seq, out in self._ledger.collect(0.0 if outputs else OUTPUT_WAIT_S):
            if self._sequences.get(out.request_id) is not seq:
                self._ledger.forget(seq)  # aborted since: its abort was reported instead
                continue
            if out.finished:
                del self._sequences[out.request_id]
            outputs.append(out)
        if self.controller is not None:
            record = self.controller.tick(time.monotonic())
            if record is not None:
                self._switch(record.new_share, record)
        return outputs

    def close(self) -> None:
        """Stop both workers (what they hold stays as it is)."""
        self.prefill.stop()
        self.decode.stop()

    # --- the split ----------------------------------------------------------------------------

    def set_split(self, prefill_share: int) -> Split:
        """Give prefill `prefill_share` percent of the compute units from each worker's next
        iteration boundary on; the controller, if any, continues from there."""
        if self.controller is not None:
            self.controller.prefill_share = prefill_share
        return self._switch(prefill_share, None)

    def _switch(self, prefill_share: int, record: SwitchRecord | None) -> Split:
        split = split_units(self.total_units, self.platform.partition_granularity, prefill_share)
        prefill_part, decode_part = self._partitions_for(split)
        self.prefill.assign(prefill_part)
        self.decode.assign(decode_part)
        self.split = split
        if record is not None:
            self._records.append(record)
        self._num_switches += 1
        return split

    def _partitions_for(self, split: Split) -> list[ComputePartition]:
        key = (split.prefill_units, split.decode_units)
        if key not in self._partitions:
            self._partitions[key] = self.platform.compute_partitions(list(key))
        return self._partitions[key]

    # --- reports (any thread) -----------------------------------------------------------------

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Until both workers hold nothing (aborted sequences freed, too); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.prefill.idle and self.decode.idle and not self._ledger.num_aborting:
                return True
            time.sleep(0.005)
        return False

    def report(self) -> SemiPDReport:
        controller = self.controller
        window = controller.last_window if controller else None
        decision = controller.last_decision if controller else None
        return SemiPDReport(
            prefill_share=self.split.prefill_share,
            prefill_units=self.split.prefill_units,
            decode_units=self.split.decode_units,
            total_units=self.total_units,
            static=self.config.semi_pd_static,
            slo_ttft_s=controller.config.slo_ttft_s if controller else None,
            slo_tpot_s=controller.config.slo_tpot_s if controller else None,
            prefill_running=self.prefill.num_running,
            prefill_waiting=self.prefill.num_waiting,
            decode_running=self.decode.num_running,
            num_switches=self._num_switches,
            last_window=asdict(window) if window else None,
            last_decision=_decision_dict(decision) if decision else None,
            records=[r.to_dict() for r in list(self._records)],
            ttft_p90_s=controller.last_ttft_p90 if controller else None,
            tpot_p90_s=controller.last_tpot_p90 if controller else None,
        )


def _controller(config: EngineConfig, now: float) -> SLOController | None:
    """The SLO controller, where SLOs are set (a static split may have none)."""
    if config.slo_ttft_ms is None or config.slo_tpot_ms is None:
        return None
    controller_config = ControllerConfig(
        slo_ttft_s=config.slo_ttft_ms / 1000,
        slo_tpot_s=config.slo_tpot_ms / 1000,
        window_s=config.semi_pd_window_s,
        min_share=min(MIN_SHARE, config.semi_pd_split),
        max_share=max(MAX_SHARE, config.semi_pd_split),
    )
    return SLOController(
        controller_config, config.semi_pd_split, now=now, static=config.semi_pd_static
    )


def _decision_dict(decision: Any) -> dict[str, Any]:
    out: dict[str, Any] = asdict(decision)
    out["reason"] = decision.reason.value
    return out
