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


KVTransport = Literal["shm", "stream", "cuda_ipc"]


class PrefillOnly(Strict):
    """Ask a prefill instance for the prompt's KV and first token only (PD disaggregation,
    docs/pd.md): it runs the prompt, samples one token, exports the prompt's K/V and ends the
    stream with a `GenerateDone` whose `kv` says where the decode instance finds them."""

    # shm: the decode instance is on the same node. The prefill instance then keeps the K/V in
    # its GPU's memory where its platform can share that (its handle says cuda_ipc), else writes
    # them to a file in the node's shared memory (shm); cuda_ipc asks the same. stream: the
    # prefill instance keeps the bytes and serves them at `GET /kv/{transfer_id}` (any node).
    # Either way they wait until fetched or expired.
    transport: KVTransport = "shm"


class KVHandle(Strict):
    """Where a prefill's exported K/V wait for the decode instance, and what they are."""

    transfer_id: str = Field(min_length=1)
    transport: KVTransport
    # shm: the file's path on the node; stream: the URL to GET; cuda_ipc: the transfer's URL on
    # the prefill instance (POST <location>/share for a CUDA IPC handle, DELETE once copied)
    location: str
    num_tokens: int = Field(ge=1)  # the prompt's tokens, whose K/V these are
    num_bytes: int = Field(ge=0)  # the serialized form (shm, stream), the tensor (cuda_ipc)
    first_token_id: int = Field(ge=0)
    export_s: float = Field(ge=0.0)  # device -> transfer buffer on the prefill instance


class GenerateRequest(Strict):
    """Exactly one of `messages` (chat template applied), `prompt` or `prompt_token_ids`.

    PD disaggregation: `prefill_only` makes this the prefill task; `kv_source` the decode task,
    which imports the handle's K/V instead of computing the prompt, streams the first token
    (sampled by the prefill instance) and continues from it. Its prompt must tokenize to the
    handle's `num_tokens`, else the instance answers 409 `kv_mismatch`; K/V it cannot fetch is a
    409 `kv_transfer_failed` (the control plane then recomputes). `generated_token_ids`
    resumes a decode whose instance died mid-stream: the tokens the client already has follow
    the prompt's and are computed with them, and the instance generates what comes next."""

    request_id: str = Field(min_length=1)
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    echo: bool = False
    prefill_only: PrefillOnly | None = None
    kv_source: KVHandle | None = None
    generated_token_ids: list[int] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        given = [x for x in (self.messages, self.prompt, self.prompt_token_ids) if x is not None]
        if len(given) != 1:
            raise ValueError("exactly one of messages, prompt or prompt_token_ids is required")
        if self.prefill_only is not None and self.kv_source is not None:
            raise ValueError("prefill_only and kv_source cannot be given together")
        pd = self.prefill_only or self.kv_source or self.generated_token_ids
        if pd and (self.sampling.n != 1 or self.echo):
            raise ValueError("a disaggregated request takes n=1 and no echo")
        if self.generated_token_ids and (self.prefill_only or self.kv_source):
            raise ValueError("a resumed request (generated_token_ids) computes its whole prompt")
        return self


class GenerateDelta(Open):
    """New text of one choice. `finish_reason` is set on the choice's last delta."""

    type: Literal["delta"] = "delta"
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    # On a stream's first delta: the prompt's tokens (the request's usage when the instance
    # dies after its last token and before its done event).
    prompt_tokens: int | None = None


class KVImport(Open):
    """How a decode instance took a prefill's K/V: bytes, and seconds to fetch them from the
    transport and to write them into its KV blocks."""

    transport: KVTransport
    num_bytes: int
    fetch_s: float
    import_s: float


class GenerateDone(Open):
    type: Literal["done"] = "done"
    prompt_tokens: int
    completion_tokens: int
    prompt_text: str | None = None  # set when the request asked for echo
    kv: KVHandle | None = None  # a prefill_only request's exported K/V
    kv_import: KVImport | None = None  # a kv_source request's import


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


InstanceRole = Literal["colocated", "prefill", "decode"]


class SemiPDConfig(Strict):
    """How a semi-PD instance runs (docs/pd.md, "semi-PD deployments"): FlowServe's `--semi-pd`
    flags. The prefill worker starts at `split` percent of the device's compute (None:
    FlowServe's default, 50) and the SLO controller moves it to meet the P90 targets, unless
    `static`."""

    slo_ttft_ms: float = Field(gt=0, allow_inf_nan=False)
    slo_tpot_ms: float = Field(gt=0, allow_inf_nan=False)
    split: int | None = Field(default=None, gt=0, lt=100)
    static: bool = False


class InstanceHealth(Open):
    status: Literal["ok", "loading"]
    instance_id: str | None = None
    role: InstanceRole = "colocated"
    model: str
    max_model_len: int
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    startup: InstanceStartup | None = None
