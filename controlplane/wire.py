"""Every shape that crosses a process boundary, in one place.

Four contracts live here, shared by the control plane, the CLI client, the node agent and the
FlowServe instance server:

- the OpenAI-compatible API (`/v1/...`): exactly OpenAI's field names, types and ranges;
- the management API (`/api/v1/...`) used by the CLI;
- the node agent protocol (agent <-> control plane);
- the FlowServe instance protocol (control plane -> instance).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# ---------------------------------------------------------------------------------------------
# Base classes
# ---------------------------------------------------------------------------------------------


class Strict(BaseModel):
    """A request body: unknown fields are rejected, as OpenAI rejects them."""

    model_config = ConfigDict(extra="forbid")


class Open(BaseModel):
    """A response body or a report: unknown fields are ignored, so older readers keep working."""

    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------------------------------------
# OpenAI: errors
# ---------------------------------------------------------------------------------------------


class ErrorDetail(Open):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(Open):
    error: ErrorDetail


# ---------------------------------------------------------------------------------------------
# OpenAI: requests
# ---------------------------------------------------------------------------------------------

Role = Literal["system", "developer", "user", "assistant", "tool"]
MAX_STOP_SEQUENCES = 4
MAX_N = 16
MAX_TOP_LOGPROBS = 20


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a conversation. Extra keys OpenAI allows (name, tool_call_id) are kept."""

    model_config = ConfigDict(extra="allow")

    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


class ResponseFormat(Strict):
    type: Literal["text"]


class SamplingFields(Strict):
    """Fields common to chat and text completions, with OpenAI's ranges, plus vLLM's extras."""

    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    user: str | None = None
    # vLLM-style extras (sent through the openai client's `extra_body`).
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    ignore_eos: bool = False
    priority: int = 0

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):
            if len(value) > MAX_STOP_SEQUENCES:
                raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
            if any(s == "" for s in value):
                raise ValueError("stop sequences must not be empty")
        elif value == "":
            raise ValueError("stop sequences must not be empty")
        return value

    @model_validator(mode="after")
    def _check_stream_options(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if all(not m.text().strip() for m in self.messages):
            raise ValueError("messages must contain some content")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(
        cls, value: str | list[int] | list[str] | list[list[int]]
    ) -> str | list[int] | list[str] | list[list[int]]:
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be empty")
            if isinstance(value[0], (str, list)):
                if len(value) != 1:
                    raise ValueError("send one prompt per request")
                return value[0]
        elif value == "":
            raise ValueError("prompt must not be empty")
        return value

    @model_validator(mode="after")
    def _check_unsupported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of must equal n")
        return self


# ---------------------------------------------------------------------------------------------
# OpenAI: responses
# ---------------------------------------------------------------------------------------------


class Usage(Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(Open):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(Open):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(Open):
    content: list[TokenLogprob] | None = None


FinishReason = Literal["stop", "length", "abort"]


class AssistantMessage(Open):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(Open):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletion(Open):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(Open):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Open):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(Open):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(Open):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(Open):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(Open):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(Open):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "deepflow"


class ModelList(Open):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------------------------
# Management API (/api/v1)
# ---------------------------------------------------------------------------------------------

NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$"


class ModelCreate(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    path: str = Field(min_length=1)
    source: str = "import"


class ModelInfo(Open):
    name: str
    path: str
    source: str
    architecture: str | None = None
    num_parameters: int | None = None
    size_bytes: int | None = None
    created_at: float


class DeploymentCreate(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    model: str = Field(min_length=1)
    replicas: int = Field(default=1, ge=0, le=256)


class DeploymentUpdate(Strict):
    replicas: int | None = Field(default=None, ge=0, le=256)


class InstanceInfo(Open):
    id: str
    deployment: str
    model: str
    node_id: str | None = None
    state: str
    url: str | None = None
    pid: int | None = None
    role: str = "colocated"
    reason: str | None = None
    created_at: float
    updated_at: float


class DeploymentInfo(Open):
    name: str
    model: str
    replicas: int
    ready_replicas: int
    created_at: float
    instances: list[InstanceInfo] = Field(default_factory=list)


class NodeResources(Open):
    cpus: int
    memory_bytes: int
    gpus: int = 0
    device: str = "cpu"


class NodeInfo(Open):
    id: str
    name: str
    url: str
    state: str
    resources: NodeResources
    last_heartbeat_at: float | None = None
    created_at: float


class EventInfo(Open):
    entity_kind: str
    entity_id: str
    from_state: str | None
    to_state: str
    reason: str
    at: float


class TaskInfo(Open):
    id: str
    job_id: str
    kind: str
    state: str
    instance_id: str | None = None
    node_id: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    events: list[EventInfo] = Field(default_factory=list)


class JobInfo(Open):
    id: str
    request_id: str
    kind: str
    state: str
    created_at: float
    finished_at: float | None = None
    error: str | None = None
    tasks: list[TaskInfo] = Field(default_factory=list)
    events: list[EventInfo] = Field(default_factory=list)


class RequestInfo(Open):
    id: str
    kind: str
    deployment: str | None = None
    state: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    created_at: float
    finished_at: float | None = None
    error: str | None = None
    jobs: list[JobInfo] = Field(default_factory=list)
    events: list[EventInfo] = Field(default_factory=list)


class PlatformStatus(Open):
    version: str
    url: str
    database: str
    home: str
    nodes: list[NodeInfo]
    deployments: list[DeploymentInfo]


class ListOf(Open):
    object: Literal["list"] = "list"
    data: list[Any]


# ---------------------------------------------------------------------------------------------
# Node agent protocol
# ---------------------------------------------------------------------------------------------

InstanceReportState = Literal["starting", "ready", "failed", "stopped"]


class NodeRegister(Strict):
    name: str = Field(min_length=1)
    url: str = Field(min_length=1)
    resources: NodeResources


class NodeRegistered(Open):
    node_id: str
    heartbeat_interval_s: float


class InstanceReport(Open):
    instance_id: str
    state: InstanceReportState
    url: str | None = None
    pid: int | None = None
    exit_code: int | None = None
    reason: str | None = None


class NodeHeartbeat(Strict):
    resources: NodeResources
    instances: list[InstanceReport] = Field(default_factory=list)


class InstanceStart(Strict):
    instance_id: str = Field(min_length=1)
    model: str
    model_path: str
    engine_args: dict[str, Any] = Field(default_factory=dict)


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


class InstanceHealth(Open):
    status: Literal["ok", "loading"]
    instance_id: str | None = None
    model: str
    max_model_len: int
    num_requests_running: int = 0
    num_requests_waiting: int = 0


# ---------------------------------------------------------------------------------------------
# OpenAI: files and fine-tuning (docs/fine-tuning.md)
# ---------------------------------------------------------------------------------------------

FilePurpose = Literal["fine-tune", "batch", "assistants", "user_data", "evals", "vision"]


class FileObject(Open):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileDeleted(Open):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class Page(Open):
    """OpenAI's cursor page: newest first; pass the last id as `after` for the next page."""

    object: Literal["list"] = "list"
    data: list[Any]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


Auto = Literal["auto"]


class Hyperparameters(Strict):
    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = "auto"
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=10)] = "auto"


class LoraConfig(Strict):
    """DeepFlow's extra: the LoRA shape (OpenAI does not expose it)."""

    rank: int = Field(default=8, ge=1, le=256)
    alpha: float = Field(default=16.0, gt=0)


class SupervisedMethod(Strict):
    hyperparameters: Hyperparameters | None = None


class FineTuneMethod(Strict):
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedMethod | None = None


class FineTuningJobCreate(Strict):
    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: FineTuneMethod | None = None
    suffix: str | None = Field(default=None, max_length=64, pattern=r"^[a-zA-Z0-9_-]*$")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None
    lora: LoraConfig | None = None

    def chosen_hyperparameters(self) -> Hyperparameters:
        if self.method is not None and self.method.supervised is not None:
            if self.method.supervised.hyperparameters is not None:
                return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


class ResolvedHyperparameters(Open):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class FineTuningError(Open):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(Open):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: FineTuningError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: ResolvedHyperparameters
    model: str
    organization_id: str = "deepflow"
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any] | None = None
    user_provided_suffix: str | None = None
    request_id: str | None = None  # DeepFlow: the request record behind the job


class FineTuningEvent(Open):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] | None = None
    type: Literal["message", "metrics"] = "message"


class FineTuningCheckpoint(Open):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, float]
    step_number: int


# ---------------------------------------------------------------------------------------------
# Training tasks (control plane -> node agent -> trainer process)
# ---------------------------------------------------------------------------------------------


class TrainingHyperparameters(Strict):
    n_epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    seed: int = 0
    lora_rank: int = Field(default=8, ge=1)
    lora_alpha: float = Field(default=16.0, gt=0)
    checkpoint_every: int = Field(default=50, ge=1)  # steps
    max_seq_len: int = Field(default=1024, ge=16)


class TrainingStart(Strict):
    task_id: str = Field(min_length=1)
    job_id: str = Field(min_length=1)
    base_model_path: str
    training_file: str
    validation_file: str | None = None
    output_dir: str
    hyperparameters: TrainingHyperparameters
    resume_from: str | None = None  # a checkpoint folder written by an earlier run


class TrainingProgress(Open):
    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    tokens: int  # trained tokens so far
    elapsed_s: float


class TrainingCheckpoint(Open):
    step: int
    path: str
    metrics: dict[str, float] = Field(default_factory=dict)


class TrainingResult(Open):
    merged_model_path: str
    adapter_path: str
    trained_tokens: int
    train_loss: float
    valid_loss: float | None = None
    steps: int


TrainingState = Literal["starting", "running", "succeeded", "failed", "stopped"]


class TrainingReport(Open):
    """What the agent tells the control plane about one training task, pushed on every change."""

    task_id: str
    state: TrainingState
    progress: TrainingProgress | None = None
    checkpoint: TrainingCheckpoint | None = None
    result: TrainingResult | None = None
    exit_code: int | None = None
    reason: str | None = None
