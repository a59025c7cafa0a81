"""The FlowServe instance protocol (control plane -> instance)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from controlplane.wire.base import Open, Strict
from controlplane.wire.openai import (
    MAX_N,
    MAX_TOP_LOGPROBS,
    ChatMessage,
    FinishReason,
    TokenLogprob,
)

# ---------------------------------------------------------------------------------------------
# FlowServe instance protocol
# ---------------------------------------------------------------------------------------------


class SamplingSpec(Strict):
    """What the engine needs to generate one request; built from an OpenAI request."""

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    n: int = Field(default=1, ge=1, le=MAX_N)
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)
    priority: int = 0


class GenerateRequest(Strict):
    """Exactly one of `messages` (chat template applied), `prompt` or `prompt_token_ids`."""

    request_id: str = Field(min_length=1)
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    echo: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        given = [x for x in (self.messages, self.prompt, self.prompt_token_ids) if x is not None]
        if len(given) != 1:
            raise ValueError("exactly one of messages, prompt or prompt_token_ids is required")
        return self


class GenerateDelta(Open):
    """New text of one choice. `finish_reason` is set on the choice's last delta."""

    type: Literal["delta"] = "delta"
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None


class GenerateDone(Open):
    type: Literal["done"] = "done"
    prompt_tokens: int
    completion_tokens: int
    prompt_text: str | None = None  # set when the request asked for echo


class GenerateError(Open):
    type: Literal["error"] = "error"
    message: str
    code: str | None = None


GenerateEvent = Annotated[GenerateDelta | GenerateDone | GenerateError, Field(discriminator="type")]


class InstanceStartup(Open):
    """How the instance started (docs/scaling.md): the launch path and the seconds each stage of
    a scale-up took, consecutive from the launch request to ready (registration is timed by the
    control plane)."""

    path: Literal["cold", "warm_pod", "fork", "ipc"]
    pod_ready_s: float  # until a process for the instance existed
    runtime_preload_s: float  # imports and device init
    weight_load_s: float  # the model (tokenizer, config, weights) loaded
    post_load_s: float  # KV cache allocated, engine thread started: ready to serve
    weights_source: Literal["disk", "dram_cache", "zygote", "cuda_ipc", "device_copy"] | None = None


class InstanceHealth(Open):
    status: Literal["ok", "loading"]
    instance_id: str | None = None
    model: str
    max_model_len: int
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    startup: InstanceStartup | None = None
