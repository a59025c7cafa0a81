"""One sequence being generated: its tokens, its sampling state and where it stands."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import torch

from dataplane.flowserve.sampling_params import SamplingParams

FinishReason = Literal["stop", "length", "abort"]


class SequenceStatus(StrEnum):
    WAITING = "waiting"  # queued, no KV cache yet
    RUNNING = "running"  # holds a KV cache; advances one token per step
    FINISHED = "finished"  # done; its KV cache is freed


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    max_tokens: int  # the params' limit, capped by what is left of max_model_len
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    # The model runner's per-sequence state (a KV cache); owned and freed by the runner.
    runner_state: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)
