"""Resuming a task whose instance died mid-stream: a disaggregated request's decode task
(docs/pd.md, "Failures") or a colocated request's one task (one choice, no echo).

The client already holds some of the answer. The executor starts another task of the same
kind on another instance that can decode, with the prompt followed by the tokens streamed so far
as its prompt (`generated_token_ids`: recomputed there, no K/V to fetch) and asking only for
what is left of `max_tokens`, and relays that task's stream to the same client. Nothing is
sent twice: the new task starts at the first token the client does not have. Greedy decoding
gives the answer an unbroken run would have given; sampling continues from the same tokens
with a fresh draw.

This module is the pure part: what the client has had, the resumed request, and the resumed
task's done event restated for the whole request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controlplane import wire
from controlplane.states import TaskKind

# Tasks started after the first one died, per request: past this the request fails.
MAX_RESUMES = 2


@dataclass(slots=True)
class StreamProgress:
    """What the client received of one request's answer (it has one choice)."""

    generate: wire.GenerateRequest  # as the client asked for it
    # The prompt's own: from the prefill's K/V handle, or the first delta of a colocated task.
    prompt_tokens: int | None
    kind: TaskKind = TaskKind.DECODE  # of the task a resume starts
    token_ids: list[int] = field(default_factory=list)
    finish_reason: wire.FinishReason | None = None
    resumes: int = 0
    # Tokens of `token_ids` that the running task got as part of its prompt.
    num_in_prompt: int = 0
    # Instances that died under this request: a resumed task never goes back to one.
    lost: set[str] = field(default_factory=set)

    def add(self, delta: wire.GenerateDelta) -> None:
        if self.prompt_tokens is None:
            self.prompt_tokens = delta.prompt_tokens
        self.token_ids.extend(delta.token_ids)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason

    def complete(self, max_tokens: int | None) -> bool:
        """The client has the whole answer; only the done event was lost (and the prompt's
        length is known, for the usage)."""
        whole = self.finish_reason is not None or (
            max_tokens is not None and len(self.token_ids) >= max_tokens
        )
        return whole and self.prompt_tokens is not None

    def resumable(self) -> bool:
        return self.resumes < MAX_RESUMES


def colocated_progress(generate: wire.GenerateRequest) -> StreamProgress | None:
    """What a colocated task tracks to be resumed if its instance dies: one choice, no echo
    (the resumed task's prompt would hold part of the answer); its prompt's length comes with
    its first delta."""
    if generate.sampling.n != 1 or generate.echo:
        return None
    return StreamProgress(generate, prompt_tokens=None, kind=TaskKind.COLOCATED)


def resumed_request(progress: StreamProgress) -> wire.GenerateRequest:
    """The request whose answer continues where the client's stops: the same input and
    sampling, the streamed tokens after the prompt, and `max_tokens` less what was streamed
    (with nothing streamed yet, the request as it came)."""
    generate = progress.generate
    sampling = generate.sampling
    if sampling.max_tokens is not None:
        left = sampling.max_tokens - len(progress.token_ids)
        sampling = sampling.model_copy(update={"max_tokens": left})
    return generate.model_copy(
        update={
            "sampling": sampling,
            "kv_source": None,
            "prefill_only": None,
            "generated_token_ids": list(progress.token_ids) or None,
        }
    )


def whole_done(done: wire.GenerateDone, progress: StreamProgress) -> wire.GenerateDone:
    """A resumed task's done event as the request's: the tokens it got in its prompt were
    the answer's, not the prompt's."""
    carried = progress.num_in_prompt
    return done.model_copy(
        update={
            "prompt_tokens": done.prompt_tokens - carried,
            "completion_tokens": done.completion_tokens + carried,
        }
    )


def completed_done(progress: StreamProgress) -> wire.GenerateDone:
    """The done event of an answer the client has in full, whose instance died before its
    own done event."""
    assert progress.prompt_tokens is not None  # `complete()` holds
    return wire.GenerateDone(
        prompt_tokens=progress.prompt_tokens, completion_tokens=len(progress.token_ids)
    )
