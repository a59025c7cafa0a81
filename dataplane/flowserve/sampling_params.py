"""Per-sequence sampling parameters, built from the wire's `SamplingSpec`."""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.wire import SamplingSpec
from dataplane.flowserve.errors import InvalidRequest

# Below this temperature sampling is greedy (vLLM's epsilon): dividing by it would overflow.
GREEDY_EPS = 1e-5
MAX_TOP_LOGPROBS = 20
_SEED_MASK = 2**64 - 1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one sequence is sampled and when it stops. `top_k` None means no top-k cut-off."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    priority: int = 0  # lower runs first and is preempted last (vLLM's convention)

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        if self.temperature < 0.0:
            raise InvalidRequest("temperature must not be negative", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidRequest("top_k must be at least 1 (or unset)", param="top_k")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest("min_p must be in [0, 1]", param="min_p")
        if self.repetition_penalty <= 0.0:
            raise InvalidRequest("repetition_penalty must be positive", param="repetition_penalty")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]", param="top_logprobs"
            )
        if any(s == "" for s in self.stop):
            raise InvalidRequest("stop sequences must not be empty", param="stop")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidRequest("stop_token_ids must not be negative", param="stop_token_ids")

    @classmethod
    def from_spec(cls, spec: SamplingSpec, index: int = 0) -> SamplingParams:
        """The params of choice `index` of `spec.n`: each choice gets seed + index, so n seeded
        choices differ from each other yet each is reproducible."""
        seed = None if spec.seed is None else (spec.seed + index) & _SEED_MASK
        return cls(
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k if spec.top_k > 0 else None,
            min_p=spec.min_p,
            presence_penalty=spec.presence_penalty,
            frequency_penalty=spec.frequency_penalty,
            repetition_penalty=spec.repetition_penalty,
            seed=seed,
            stop=tuple(spec.stop),
            stop_token_ids=tuple(spec.stop_token_ids),
            ignore_eos=spec.ignore_eos,
            logprobs=spec.logprobs or spec.top_logprobs > 0,
            top_logprobs=spec.top_logprobs,
            priority=spec.priority,
        )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )
