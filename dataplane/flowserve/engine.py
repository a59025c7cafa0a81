"""The engine: requests in, one token per running sequence per `step()` out.

This interface is what the server drives and what stays put while the internals change:

    engine.add_request(request_id, prompt_token_ids, params)   # may raise InvalidRequest
    engine.abort_request(request_id)                          # frees it now, reported by step()
    outputs = engine.step()                                   # list[StepOutput]
    engine.has_unfinished()

PD disaggregation (docs/flowserve.md) adds two kinds of request:

    engine.add_request(..., prefill_only=True)   # one token; its last StepOutput has `kv`
    engine.add_request(..., imported=prompt_kv)  # no prefill: the K/V are written into its
                                                 # blocks, its first StepOutput is kv's token

It is not thread-safe: one thread owns it (the server's driver thread).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from dataplane.flowserve.block_manager import BlockManager
from dataplane.flowserve.config import (
    EngineConfig,
    resolve_device,
    resolve_dtype,
    resolve_max_model_len,
)
from dataplane.flowserve.errors import (
    ConfigError,
    DuplicateRequest,
    InvalidRequest,
    PromptTooLong,
)
from dataplane.flowserve.kv_cache import (
    MemoryProfile,
    num_blocks_for_budget,
    resolve_kv_cache_budget,
)
from dataplane.flowserve.model_runner import ModelRunner, PendingTokens
from dataplane.flowserve.models import ModelConfig, load_model
from dataplane.flowserve.platform import get_platform
from dataplane.flowserve.prompt_kv import (
    KVLayout,
    PendingExport,
    PromptKV,
    skip_first_draw,
    start_export,
)
from dataplane.flowserve.sampler import Logprob, needs_host, sample, sample_tokens
from dataplane.flowserve.sampling_params import SamplingParams
from dataplane.flowserve.scheduler import ScheduledBatch, Scheduler
from dataplane.flowserve.sequence import FinishReason, Sequence, SequenceStatus
from dataplane.flowserve.weights_cache import ready_weights

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepOutput:
    """What one step did to one sequence. An abort carries no token.

    PD disaggregation: a prefill-only sequence's output (its one token) carries `kv`, its
    prompt's K/V; an imported sequence's first output (the token that came with its K/V) carries
    `kv_import_s`, the seconds spent writing the K/V into its blocks.

    A message, yet not frozen: a frozen dataclass's `__init__` costs ~1.2 us against ~0.25 us,
    and a step makes one per running sequence. Nothing changes one once made."""

    request_id: str
    new_token_id: int | None
    logprob: Logprob | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    kv: PromptKV | None = None
    kv_import_s: float | None = None


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot for metrics and load reports (vLLM's names)."""

    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage_perc: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int


@dataclass(slots=True)
class _InFlight:
    """A launched batch whose sampled tokens the host has not read yet."""

    sampling: list[Sequence]  # the sequences that sample, in token order
    tokens: torch.Tensor  # [num_sampling] on the device: the next batch's inputs read them
    rows: dict[Sequence, int]  # sequence -> its index in `tokens`
    host_tokens: torch.Tensor  # the same, copied to the host once `event` is complete
    event: Any  # None where the copy is already complete
    exports: dict[Sequence, PendingExport]  # prefill-only sequences that sample in this batch


class Engine:
    def __init__(
        self, config: EngineConfig, *, weights: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """`weights`: the model's state already converted (`weights_cache`), e.g. a forked
        instance's parent's; else config.weights_cache's entry for the model, else the folder."""
        if config.semi_pd and type(self) is Engine:
            raise ConfigError("a semi-PD configuration needs open_engine(), not Engine()")
        self.config = config
        self.device = resolve_device(config.device)
        self.platform = get_platform(self.device)
        dtype = resolve_dtype(config.dtype, self.device)
        try:
            self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
                config.model, local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load a tokenizer from {config.model}: {exc}") from exc
        hf_config = _read_config(config.model)
        self.max_model_len = resolve_max_model_len(config.max_model_len, hf_config)
        self.weights = ready_weights(
            weights,
            config.weights_cache,
            config.model,
            dtype,
            device=self.device,
            peer=config.weights_peer,
            peer_mode=config.weights_peer_mode,
        )
        model, model_config = load_model(
            config.model,
            dtype,
            self.device,
            max_positions=self.max_model_len,
            ready=self.weights.tensors,
        )
        self.weights_loaded_at = time.time()  # a startup mark (startup.py)
        self.vocab_size = model_config.vocab_size
        self.eos_token_ids = _eos_token_ids(self.tokenizer, config.model)
        self._runner = ModelRunner(
            model,
            model_config,
            platform=self.platform,
            block_size=config.block_size,
            dtype=dtype,
            max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs,
            enforce_eager=config.enforce_eager,
        )
        fraction = config.kv_cache_fraction_or_default(self.platform)
        self.kv_budget = resolve_kv_cache_budget(
            self.device,
            num_bytes=config.kv_cache_bytes,
            fraction=fraction,
            reserved_bytes=0 if fraction is None else self._activation_bytes(model_config, dtype),
        )
        num_blocks = num_blocks_for_budget(
            self.kv_budget.num_bytes, model_config, config.block_size, dtype
        )
        # Twice what max_num_seqs full-length sequences hold: the rest would only ever serve
        # the prefix cache, and every block costs bookkeeping.
        max_blocks = 2 * config.max_num_seqs * -(-self.max_model_len // config.block_size)
        self._runner.allocate_kv_cache(min(num_blocks, max_blocks))
        self._runner.capture_graphs()
        self.block_manager = BlockManager(self._runner.num_blocks, config.block_size)
        self._scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
        )
        self._sequences: dict[str, Sequence] = {}
        # The live sequences whose sampling reads host state (penalties, logprobs): kept as a
        # set so that a step need not ask all of them.
        self._host_sampled: set[Sequence] = set()
        self._reported: list[StepOutput] = []  # aborts and the like: the next step() reports them
        self._seeds = random.Random(config.seed)  # for sequences that bring no seed
        self.num_preemptions = 0
        # Async scheduling: step k schedules and launches batch k, then reads batch k-1's tokens,
        # so the host's work overlaps the device's. Where the device is the host, nothing gains.
        self.async_scheduling = (
            config.async_scheduling
            if config.async_scheduling is not None
            else self.platform.event() is not None
        )
        self._in_flight: _InFlight | None = None
        log.info("%s", self.describe_kv_cache())

    def close(self) -> None:
        """Release what the engine holds beyond memory (semi-PD: its worker threads)."""

    def _activation_bytes(self, model_config: ModelConfig, dtype: torch.dtype) -> int:
        """What a full step's activations need on top of the weights: from the stored profile
        when it matches, else measured by a profiling pass (and stored, when a path is set)."""
        config = self.config
        key = "|".join(
            str(part)
            for part in (
                model_config.model_type,
                model_config.hidden_size,
                model_config.num_hidden_layers,
                model_config.vocab_size,
                self.platform.device_name(),
                dtype,
                config.max_num_batched_tokens,
                config.max_num_seqs,
                self.max_model_len,
                torch.__version__,
            )
        )
        path = Path(config.memory_profile) if config.memory_profile else None
        stored = MemoryProfile.load(path, key) if path is not None else None
        if stored is not None:
            log.info("activation memory from %s: %d MiB", path, stored.activation_bytes >> 20)
            return stored.activation_bytes
        measured = self._runner.profile_activations(config.max_num_batched_tokens)
        if path is not None and measured:
            MemoryProfile(key, measured).save(path)
        return measured

    def weight_tensors(self) -> dict[str, torch.Tensor]:
        """The model's weights as loaded (what another instance can share: cuda_share)."""
        return dict(self._runner.model.state_dict())

    def describe_kv_cache(self) -> str:
        """The start-up report of the KV budget and what it bought."""
        blocks, size = self._runner.num_blocks, self.config.block_size
        return (
            f"KV cache: budget {self.kv_budget.describe()}, {blocks} blocks of {size} tokens "
            f"({blocks * size} tokens) on {self.device.type}"
        )

    @property
    def num_running(self) -> int:
        return len(self._scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self._scheduler.waiting)

    @property
    def num_kv_blocks(self) -> int:
        return self._runner.num_blocks

    @property
    def kv_layout(self) -> KVLayout:
        """What imported K/V must look like (PD disaggregation)."""
        return self._runner.kv_layout

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_requests_running=self.num_running,
            num_requests_waiting=self.num_waiting,
            kv_cache_usage_perc=bm.usage,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
        )

    def has_unfinished(self) -> bool:
        """True while some request has not yet been reported finished by `step()`."""
        return (
            self._scheduler.has_unfinished() or bool(self._reported) or self._in_flight is not None
        )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        prefill_only: bool = False,
        imported: PromptKV | None = None,
        export_on_device: bool = False,
    ) -> None:
        """`prefill_only`: generate exactly one token and export the prompt's K/V with it (left
        on the device with `export_on_device`, for a hand-off through device memory).
        `imported`: the prompt's K/V and first token, computed elsewhere (a prefill instance):
        the sequence continues from them as if it had computed them itself. Raises
        InvalidRequest (KVMismatch for K/V that do not fit the prompt or this engine)."""
        if prefill_only and imported is not None:
            raise InvalidRequest("a request is either prefill-only or imported, not both")
        if request_id in self._sequences:
            raise DuplicateRequest(request_id)
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest(
                f"token id {bad[0]} is out of the vocabulary [0, {self.vocab_size})",
                param="prompt_token_ids",
            )
        if imported is not None:
            self.kv_layout.check(imported, prompt_token_ids, self.vocab_size)
        room = self.max_model_len - len(prompt_token_ids)
        max_tokens = max(1, room if params.max_tokens is None else min(params.max_tokens, room))
        if prefill_only:
            max_tokens = 1
        generator = torch.Generator(device=self.device)
        generator.manual_seed(
            params.seed if params.seed is not None else self._seeds.getrandbits(64)
        )
        seq = Sequence(
            request_id,
            list(prompt_token_ids),
            params,
            generator,
            max_tokens,
            priority=params.priority,
            prefill_only=prefill_only,
            export_on_device=prefill_only and export_on_device,
        )
        if imported is not None and self._add_imported(seq, imported):
            return
        self._queue(seq)

    def _queue(self, seq: Sequence) -> None:
        """Hand a new sequence to the scheduler; raises InvalidRequest if it can never run."""
        self._scheduler.add(seq)
        self._sequences[seq.request_id] = seq
        if needs_host([seq]):
            self._host_sampled.add(seq)

    def _add_imported(self, seq: Sequence, imported: PromptKV) -> bool:
        """Give `seq` its imported K/V and first token; True when that token already ends it
        (max_tokens=1, eos, a stop token): then it is reported by the next step, taking no
        blocks, and never queued."""
        if seq.num_prompt_tokens > self.max_model_len:
            raise PromptTooLong(seq.num_prompt_tokens, self.max_model_len)
        first = imported.first_token_id
        seq.output_token_ids.append(first)
        if not seq.params.greedy:
            skip_first_draw(seq.generator, self.vocab_size)
        reason = self._finish_reason(seq, first)
        if reason is None:
            seq.imported_kv = imported
            return False
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self._reported.append(StepOutput(seq.request_id, first, None, True, reason))
        return True

    def abort_request(self, request_id: str) -> None:
        """Free the sequence now; the next `step()` reports it with finish_reason "abort".
        Unknown or already finished ids are ignored: a finish and an abort can cross."""
        seq = self._sequences.pop(request_id, None)
        if seq is None:
            return
        self._host_sampled.discard(seq)
        self._scheduler.abort(request_id)
        self._reported.append(StepOutput(request_id, None, None, True, "abort"))

    def step(self) -> list[StepOutput]:
        if not self.async_scheduling:
            return self._step_sync()
        if self._host_sampled:  # penalties or logprobs read the host: one step at a time
            return self._finish_in_flight() + self._step_sync()
        outputs, self._reported = self._reported, []
        batch = self._scheduler.schedule()
        self.num_preemptions += len(batch.preempted)
        outputs += self._reject(batch)
        outputs += self._import(batch)
        launched = self._launch(batch) if batch.seqs else None
        outputs += self._finish_in_flight()
        self._in_flight = launched
        return outputs

    def _launch(self, batch: ScheduledBatch) -> _InFlight:
        """Run `batch` and sample on the device; start copying the tokens back. No host sync."""
        previous = self._in_flight
        pending = PendingTokens(previous.tokens, previous.rows) if previous is not None else None
        self._runner.copy_blocks(batch.copies)
        logits = self._runner.run(batch, pending)  # [num_sampling_seqs, vocab_size]
        sampling = batch.sampling_seqs
        tokens = sample_tokens(logits, sampling) if sampling else logits.new_empty(0).long()
        host_tokens, event = self.platform.to_host_async(tokens)
        # Gathered now, behind the forward pass: by the time the token is read the sequence may
        # have been preempted (its blocks reused), but what was launched before is unaffected.
        exports = self._start_exports(sampling)
        self._scheduler.advance(batch)
        rows = {seq: i for i, seq in enumerate(sampling)}
        return _InFlight(sampling, tokens, rows, host_tokens, event, exports)

    def _finish_in_flight(self) -> list[StepOutput]:
        """Read the launched batch's tokens (waiting for them) and land them."""
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return []
        if flight.event is not None:
            flight.event.synchronize()
        outputs = []
        token_ids = flight.host_tokens.tolist()
        self._scheduler.record(flight.sampling, token_ids)
        finished, finish_reason = SequenceStatus.FINISHED, self._finish_reason
        for seq, token_id in zip(flight.sampling, token_ids, strict=True):
            if seq.status is finished:
                continue  # aborted meanwhile: its abort is reported instead
            reason = finish_reason(seq, token_id)
            if reason is None:
                outputs.append(StepOutput(seq.request_id, token_id))
                continue
            self._retire(seq, reason)
            export = flight.exports.get(seq)
            kv = export.finish(token_id, seq.prompt_token_ids) if export else None
            outputs.append(StepOutput(seq.request_id, token_id, None, True, reason, kv))
        return outputs

    def _start_exports(self, sampling: list[Sequence]) -> dict[Sequence, PendingExport]:
        """Launch the gather of every prefill-only sequence's prompt K/V and its copy to the
        host (pinned where the platform has that), after the forward pass that computed them."""
        exports = {}
        for seq in sampling:
            if not seq.prefill_only:
                continue
            started = time.perf_counter()
            gathered = self._runner.gather_kv(seq.block_table, seq.num_prompt_tokens)
            kv, event = start_export(gathered, self.platform, on_device=seq.export_on_device)
            exports[seq] = PendingExport(kv, event, time.perf_counter() - started)
        return exports

    def _import(self, batch: ScheduledBatch) -> list[StepOutput]:
        """Write the K/V of the sequences admitted with them into their blocks (before this
        batch's forward pass) and report the token each brought as its first output."""
        outputs = []
        for seq in batch.imports:
            imported, seq.imported_kv = seq.imported_kv, None
            assert imported is not None
            started = time.perf_counter()
            self._runner.scatter_kv(seq.block_table, seq.num_cached_tokens, imported.kv)
            self.block_manager.seal_full_blocks(seq)  # the prompt's blocks serve the prefix cache
            took = time.perf_counter() - started
            token_id = imported.first_token_id
            outputs.append(StepOutput(seq.request_id, token_id, None, kv_import_s=took))
        return outputs

    def _reject(self, batch: ScheduledBatch) -> list[StepOutput]:
        outputs = []
        for seq, why in batch.rejected:
            log.warning("request %s ends early: %s", seq.request_id, why)
            self._retire(seq, "length")
            outputs.append(StepOutput(seq.request_id, None, None, True, "length"))
        return outputs

    def _step_sync(self) -> list[StepOutput]:
        outputs, self._reported = self._reported, []
        batch = self._scheduler.schedule()
        self.num_preemptions += len(batch.preempted)
        outputs += self._reject(batch)
        outputs += self._import(batch)
        if not batch.seqs:
            return outputs
        self._runner.copy_blocks(batch.copies)
        logits = self._runner.run(batch)  # [num_sampling_seqs, vocab_size]
        sampling = batch.sampling_seqs
        exports = self._start_exports(sampling)
        result = sample(logits, sampling) if sampling else None
        self._scheduler.postprocess(batch, result.token_ids if result else [])
        if result is None:
            return outputs
        for seq, token_id, logprob in zip(sampling, result.token_ids, result.logprobs, strict=True):
            reason = self._finish_reason(seq, token_id)
            if reason is not None:
                self._retire(seq, reason)
            export = exports.get(seq)
            kv = export.finish(token_id, seq.prompt_token_ids) if export else None
            outputs.append(
                StepOutput(seq.request_id, token_id, logprob, reason is not None, reason, kv)
            )
        return outputs

    def _retire(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        self._scheduler.finish(seq)
        self._sequences.pop(seq.request_id, None)
        self._host_sampled.discard(seq)

    def _finish_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        params = seq.params
        if token_id in params.stop_token_ids or (
            not params.ignore_eos and token_id in self.eos_token_ids
        ):
            return "stop"
        num_output = len(seq.output_token_ids)
        if (
            num_output >= seq.max_tokens
            or len(seq.prompt_token_ids) + num_output + seq.num_pending_tokens >= self.max_model_len
        ):
            return "length"
        return None


def open_engine(
    config: EngineConfig, *, weights: Mapping[str, torch.Tensor] | None = None
) -> Engine:
    """The engine `config` asks for: one that steps its batches itself, or semi-PD's two
    workers behind the same interface (`config.semi_pd`)."""
    if config.semi_pd:
        from dataplane.flowserve.semipd.engine import SemiPDEngine

        return SemiPDEngine(config, weights=weights)
    return Engine(config, weights=weights)


def _read_config(path: str) -> dict[str, Any]:
    try:
        loaded: dict[str, Any] = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}/config.json: {exc}") from exc
    return loaded


def _eos_token_ids(tokenizer: PreTrainedTokenizerBase, path: str) -> frozenset[int]:
    """The tokenizer's eos plus generation_config's (chat models often list several)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        generation = json.loads((Path(path) / "generation_config.json").read_text())
    except (OSError, ValueError):
        generation = {}
    configured = generation.get("eos_token_id")
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(int(i) for i in configured)
    return frozenset(ids)
