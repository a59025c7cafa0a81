"""PD disaggregation in the chat job executor (docs/pd.md): what the scheduler is told about a
request, the deployment's learned policy, and the prefill task.

A disaggregated chat job is two tasks: the prefill task asks a prefill instance for the prompt's
K/V and first token (`run_prefill` -> a `wire.KVHandle`), then the decode task sends the same
request with that handle as its `kv_source` to a decode instance, which streams the answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
from pydantic import TypeAdapter, ValidationError

from controlplane import wire
from controlplane.routing.decode_predictor import (
    DecodeLengthPredictor,
    FinishedRequest,
    PromptTokenEstimator,
)
from controlplane.routing.dist_sched import RouterThresholds, SchedPolicy, SchedRequest
from controlplane.routing.pd_heatmap import Mode, PDHeatmap
from controlplane.routing.policy import InstanceLoad
from controlplane.routing.prefix_index import PrefixIndex

log = logging.getLogger(__name__)

_EVENT = TypeAdapter(wire.GenerateEvent)


def prompt_text(generate: wire.GenerateRequest) -> str:
    """The prompt as the router sees it: its text, for prefix matching and length estimates."""
    if generate.messages is not None:
        return "".join(f"<{m.role}>{m.text()}" for m in generate.messages)
    if generate.prompt is not None:
        return generate.prompt
    return " ".join(str(i) for i in generate.prompt_token_ids or ())


def sched_request(generate: wire.GenerateRequest, text: str) -> SchedRequest:
    tokens = len(generate.prompt_token_ids) if generate.prompt_token_ids is not None else None
    return SchedRequest(
        prompt_chars=len(text),
        prompt_tokens=tokens,
        max_tokens=generate.sampling.max_tokens,
        n=generate.sampling.n,
        echo=generate.echo,
    )


@dataclass(slots=True, frozen=True)
class PolicyInputs:
    """What the database holds for one deployment's scheduling: its stored PD heatmap and the
    recent history of its finished requests."""

    heatmap: dict[str, object] | None
    history: list[tuple[int | None, int, int]]  # (prompt_chars, prompt_tokens, completion_tokens)


LoadInputs = Callable[[str], Awaitable[PolicyInputs]]


@dataclass(slots=True)
class _Learned:
    heatmap: PDHeatmap | None = None
    predictor: DecodeLengthPredictor = field(default_factory=DecodeLengthPredictor)
    estimator: PromptTokenEstimator = field(default_factory=PromptTokenEstimator)
    loaded_at: float | None = None
    loading: asyncio.Task[None] | None = None


class PolicyBook:
    """Each deployment's scheduling policy, learned from its records and refreshed in the
    background at most every `refresh_s` (the request path never waits on SQL), and one prefix
    index of what was routed where."""

    def __init__(
        self,
        load: LoadInputs | None,
        *,
        thresholds: RouterThresholds,
        refresh_s: float,
        clock: Callable[[], float],
    ) -> None:
        self._load = load
        self.thresholds = thresholds
        self.refresh_s = refresh_s
        self._clock = clock
        self._learned: dict[str, _Learned] = {}
        self._indexes: dict[str, PrefixIndex] = {}

    def policy(self, deployment: str, default_mode: Mode) -> SchedPolicy:
        learned = self._learned.setdefault(deployment, _Learned())
        stale = learned.loaded_at is None or self._clock() - learned.loaded_at >= self.refresh_s
        if self._load is not None and stale and learned.loading is None:
            learned.loading = asyncio.create_task(
                self._refresh(deployment, learned), name=f"pd-policy-{deployment}"
            )
        return SchedPolicy(
            heatmap=learned.heatmap,
            predictor=learned.predictor,
            estimator=learned.estimator,
            thresholds=self.thresholds,
            default_mode=default_mode,
        )

    async def refresh(self, deployment: str) -> None:
        """Load the deployment's policy now (after a profile run stores a new heatmap)."""
        await self._refresh(deployment, self._learned.setdefault(deployment, _Learned()))

    async def _refresh(self, deployment: str, learned: _Learned) -> None:
        assert self._load is not None
        try:
            inputs = await self._load(deployment)
            learned.heatmap = PDHeatmap.from_json(inputs.heatmap) if inputs.heatmap else None
            learned.predictor = DecodeLengthPredictor.fit(
                FinishedRequest(prompt_tokens=p, completion_tokens=c) for _, p, c in inputs.history
            )
            learned.estimator = PromptTokenEstimator.fit(
                (chars, p) for chars, p, _ in inputs.history if chars
            )
        except Exception:  # a bad stored heatmap must not break routing: keep the last policy
            log.exception("cannot load the scheduling policy of %s", deployment)
        finally:
            learned.loaded_at = self._clock()
            learned.loading = None

    def matches(self, deployment: str, text: str) -> dict[str, int]:
        index = self._indexes.get(deployment)
        return index.match(text) if index is not None else {}

    def remember(self, deployment: str, instance_id: str, text: str) -> None:
        """The prompt went to this instance: its prefix cache now holds it."""
        self._indexes.setdefault(deployment, PrefixIndex()).insert(instance_id, text)

    def forget(self, deployment: str, keep: set[str]) -> None:
        """Drop what the index holds for instances that are gone."""
        index = self._indexes.get(deployment)
        if index is not None:
            for instance_id in set(index.instances()) - keep:
                index.remove_instance(instance_id)


class PrefillFailed(Exception):
    """The prefill task did not produce K/V. `retry` says whether another prefill instance may
    succeed (the instance failed) or not (the request itself was refused)."""

    def __init__(self, message: str, *, retry: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry = retry
        self.status = status


async def run_prefill(
    http: httpx.AsyncClient,
    instance: InstanceLoad,
    generate: wire.GenerateRequest,
    transport: wire.KVTransport,
    timeout_s: float,
) -> tuple[wire.KVHandle, int]:
    """Run the prompt on a prefill instance: the handle of its exported K/V and the prompt's
    token count. Raises PrefillFailed; a cancel (the client went away) closes the stream, which
    aborts the prefill on the instance."""
    body = generate.model_copy(update={"prefill_only": wire.PrefillOnly(transport=transport)})
    request = http.build_request(
        "POST", f"{instance.url}/generate", content=body.model_dump_json(exclude_none=True)
    )
    try:
        async with asyncio.timeout(timeout_s):
            response = await http.send(request, stream=True)
            try:
                if response.status_code != 200:
                    raw = await response.aread()
                    raise PrefillFailed(
                        f"prefill instance {instance.id} answered {response.status_code}: "
                        f"{raw[:300].decode(errors='replace')}",
                        retry=response.status_code >= 500,
                        status=response.status_code,
                    )
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    event = _EVENT.validate_json(line)
                    if isinstance(event, wire.GenerateError):
                        raise PrefillFailed(
                            f"prefill instance {instance.id}: {event.message}", retry=True
                        )
                    if isinstance(event, wire.GenerateDone):
                        if event.kv is None:
                            raise PrefillFailed(
                                f"prefill instance {instance.id} returned no K/V", retry=True
                            )
                        return event.kv, event.prompt_tokens
            finally:
                await response.aclose()
    except TimeoutError as exc:
        raise PrefillFailed(
            f"prefill instance {instance.id} took longer than {timeout_s:g} s", retry=True
        ) from exc
    except (httpx.HTTPError, ValidationError) as exc:
        raise PrefillFailed(
            f"prefill instance {instance.id} failed: {exc.__class__.__name__}: {exc}", retry=True
        ) from exc
    raise PrefillFailed(f"prefill instance {instance.id} ended the stream early", retry=True)


async def drop_transfer(http: httpx.AsyncClient, handle: wire.KVHandle) -> None:
    """Best effort: free K/V a decode task will never fetch (the instance's TTL is the backstop).
    An shm file is the node's, out of reach; stream and cuda_ipc K/V are the prefill instance's."""
    if handle.transport == "shm":
        return
    try:
        await http.delete(handle.location, timeout=2.0)
    except httpx.HTTPError as exc:
        log.debug("could not drop K/V transfer %s: %s", handle.transfer_id, exc)
