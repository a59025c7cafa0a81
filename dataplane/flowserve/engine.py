"""The engine: requests in, one token per running sequence per `step()` out.

This interface is what the server drives and what stays put while the internals change:

    engine.add_request(request_id, prompt_token_ids, params)   # may raise InvalidRequest
    engine.abort_request(request_id)                          # frees it now, reported by step()
    outputs = engine.step()                                   # list[StepOutput]
    engine.has_unfinished()

It is not thread-safe: one thread owns it (the server's driver thread).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from dataplane.flowserve.config import (
    EngineConfig,
    resolve_device,
    resolve_dtype,
    resolve_max_model_len,
)
from dataplane.flowserve.errors import ConfigError, DuplicateRequest, InvalidRequest, PromptTooLong
from dataplane.flowserve.model_runner import ModelRunner, load_model
from dataplane.flowserve.sampler import Logprob, sample
from dataplane.flowserve.sampling_params import SamplingParams
from dataplane.flowserve.scheduler import Scheduler
from dataplane.flowserve.sequence import FinishReason, Sequence


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What one step did to one sequence. An abort carries no token."""

    request_id: str
    new_token_id: int | None
    logprob: Logprob | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, self.device)
        try:
            self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
                config.model, local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load a tokenizer from {config.model}: {exc}") from exc
        model = load_model(config.model, dtype, self.device)
        self.max_model_len = resolve_max_model_len(config.max_model_len, model.config)
        self.vocab_size = int(model.config.vocab_size)
        self.eos_token_ids = _eos_token_ids(self.tokenizer, model)
        self._runner = ModelRunner(model)
        self._scheduler = Scheduler(config.max_num_seqs)
        self._sequences: dict[str, Sequence] = {}
        self._aborted: list[StepOutput] = []  # reported by the next step()
        self._seeds = random.Random(config.seed)  # for sequences that bring no seed

    @property
    def num_running(self) -> int:
        return len(self._scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self._scheduler.waiting)

    def has_unfinished(self) -> bool:
        """True while some request has not yet been reported finished by `step()`."""
        return self._scheduler.has_unfinished() or bool(self._aborted)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        if request_id in self._sequences:
            raise DuplicateRequest(request_id)
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if len(prompt_token_ids) > self.max_model_len:
            raise PromptTooLong(len(prompt_token_ids), self.max_model_len)
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest(
                f"token id {bad[0]} is out of the vocabulary [0, {self.vocab_size})",
                param="prompt_token_ids",
            )
        room = self.max_model_len - len(prompt_token_ids)
        max_tokens = max(1, room if params.max_tokens is None else min(params.max_tokens, room))
        generator = torch.Generator(device=self.device)
        generator.manual_seed(
            params.seed if params.seed is not None else self._seeds.getrandbits(64)
        )
        seq = Sequence(request_id, list(prompt_token_ids), params, generator, max_tokens)
        self._sequences[request_id] = seq
        self._scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        """Free the sequence now; the next `step()` reports it with finish_reason "abort".
        Unknown or already finished ids are ignored: a finish and an abort can cross."""
        seq = self._sequences.pop(request_id, None)
        if seq is None:
            return
        self._scheduler.finish(seq)
        self._runner.free(seq)
        seq.finish_reason = "abort"
        self._aborted.append(StepOutput(request_id, None, None, True, "abort"))

    def step(self) -> list[StepOutput]:
        outputs, self._aborted = self._aborted, []
        batch = self._scheduler.schedule()
        if not batch:
            return outputs
        logits = self._runner.forward(batch)  # [num_seqs, vocab_size]
        result = sample(logits, batch)
        for seq, token_id, logprob in zip(batch, result.token_ids, result.logprobs, strict=True):
            seq.output_token_ids.append(token_id)
            reason = self._finish_reason(seq, token_id)
            if reason is not None:
                seq.finish_reason = reason
                self._scheduler.finish(seq)
                self._runner.free(seq)
                del self._sequences[seq.request_id]
            outputs.append(
                StepOutput(seq.request_id, token_id, logprob, reason is not None, reason)
            )
        return outputs

    def _finish_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        if not seq.params.ignore_eos and token_id in self.eos_token_ids:
            return "stop"
        if token_id in seq.params.stop_token_ids:
            return "stop"
        if len(seq.output_token_ids) >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None


def _eos_token_ids(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module) -> frozenset[int]:
    """The tokenizer's eos plus generation_config's (chat models often list several)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list | tuple):
        ids.update(int(i) for i in configured)
    return frozenset(ids)
