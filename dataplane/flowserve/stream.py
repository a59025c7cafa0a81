"""Turns one request's engine outputs into the instance protocol's events.

A request has `n` choices; choice `i` runs in the engine as sequence `sequence_id(request_id, i)`.
Each choice has its own `Detokenizer`. Tokens whose text is still held back (half a character, or
what may become a stop string) are kept and sent with the next delta that carries text, so every
delta's `token_ids` and `logprobs` line up with its `text`. A stop string is found here, not in the
engine: `RequestStream.on_output` then asks the caller to abort that sequence.

PD disaggregation: a prefill-only stream sends no deltas; its end is a `KVExported` (never on
the wire: the server stores the K/V and sends the done event with their handle). A stream fed
by imported K/V (`KVSource`) runs as any other and reports the import on its done event.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from controlplane.wire import (
    GenerateDelta,
    GenerateDone,
    GenerateError,
    KVImport,
    KVTransport,
    TokenLogprob,
    TopLogprob,
)
from dataplane.flowserve.detokenizer import Decoder, Detokenizer
from dataplane.flowserve.engine import StepOutput
from dataplane.flowserve.prompt_kv import PromptKV
from dataplane.flowserve.sampler import Logprob
from dataplane.flowserve.sampling_params import SamplingParams
from dataplane.flowserve.sequence import FinishReason
from dataplane.flowserve.token_text import TokenTexts


def sequence_id(request_id: str, index: int) -> str:
    return f"{request_id}/{index}"


@dataclass(slots=True)
class _Choice:
    detokenizer: Detokenizer
    want_logprobs: bool
    num_tokens: int = 0
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None


@dataclass(frozen=True, slots=True)
class KVExported:
    """A prefill-only request's end: its done event (without `kv` yet) and the K/V to hand over.
    Internal: the server turns it into the done event with the transfer's handle."""

    done: GenerateDone
    kv: PromptKV


@dataclass(frozen=True, slots=True)
class KVSource:
    """A decode request's K/V, fetched from a prefill instance, and how the fetch went."""

    kv: PromptKV
    transport: KVTransport
    num_bytes: int
    fetch_s: float


@dataclass(frozen=True, slots=True)
class OutputEvents:
    """What one engine output produced: a delta to send (or None) and, when a stop string ended
    the choice, the sequence the caller must abort in the engine."""

    delta: GenerateDelta | None = None
    abort_sequence: str | None = None


class RequestStream:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: Seq[SamplingParams],
        tokenizer: Decoder,
        token_texts: TokenTexts,
        prompt_text: str | None = None,
        *,
        prefill_only: bool = False,
        export_on_device: bool = False,
        kv_source: KVSource | None = None,
    ) -> None:
        """`export_on_device`: a prefill-only request's K/V stay on the device (a hand-off
        through device memory)."""
        if (prefill_only or kv_source is not None) and len(params) != 1:
            raise ValueError("a disaggregated request has one choice")
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = list(params)
        self.prompt_text = prompt_text
        self.prefill_only = prefill_only
        self.export_on_device = prefill_only and export_on_device
        # Only the K/V themselves go to the engine (`take_imported`): once written they are
        # freed, not kept for as long as the request streams (they may be in device memory).
        self._kv_import = (
            None
            if kv_source is None
            else KVImport(
                transport=kv_source.transport,
                num_bytes=kv_source.num_bytes,
                fetch_s=kv_source.fetch_s,
                import_s=0.0,
            )
        )
        self._imported = kv_source.kv if kv_source is not None else None
        self._import_s = 0.0
        self._sent_delta = False  # the first delta carries the prompt's length
        self._exported: PromptKV | None = None
        self._token_texts = token_texts
        self._choices = [
            _Choice(Detokenizer(tokenizer, prompt_token_ids, p.stop), p.logprobs) for p in params
        ]

    @property
    def sequence_ids(self) -> list[str]:
        return [sequence_id(self.request_id, i) for i in range(len(self._choices))]

    def unfinished_sequence_ids(self) -> list[str]:
        return [
            sequence_id(self.request_id, i)
            for i, c in enumerate(self._choices)
            if c.finish_reason is None
        ]

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self._choices)

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self._choices)

    def take_imported(self) -> PromptKV | None:
        """The imported K/V, once (the engine holds them from then on, until they are written)."""
        imported, self._imported = self._imported, None
        return imported

    def done(self) -> GenerateDone | GenerateError | KVExported:
        kv_import = self._kv_import
        done = GenerateDone(
            prompt_tokens=len(self.prompt_token_ids),
            completion_tokens=self.completion_tokens,
            prompt_text=self.prompt_text,
            kv_import=None
            if kv_import is None
            else kv_import.model_copy(update={"import_s": self._import_s}),
        )
        if not self.prefill_only:
            return done
        # Handed over once: the K/V (device memory, for a cuda_ipc hand-off) live on in the
        # transfer store alone, not for as long as something still holds this stream.
        exported, self._exported = self._exported, None
        if exported is None:
            reason = self._choices[0].finish_reason
            return GenerateError(
                message=f"the prefill ended ({reason}) without K/V to export",
                code="kv_export_failed",
            )
        return KVExported(done, exported)

    def on_output(self, index: int, out: StepOutput) -> OutputEvents:
        choice = self._choices[index]
        if choice.finish_reason is not None:
            return OutputEvents()  # e.g. the abort that follows a stop string
        if out.kv_import_s is not None:
            self._import_s = out.kv_import_s
        if self.prefill_only:  # no text: the token and the K/V go to the decode instance
            if out.new_token_id is not None:
                choice.num_tokens += 1
            if out.kv is not None:
                self._exported = out.kv
            if out.finished:
                choice.finish_reason = out.finish_reason
            return OutputEvents()
        text = ""
        reason = out.finish_reason if out.finished else None
        if out.new_token_id is not None:
            choice.num_tokens += 1
            choice.pending_ids.append(out.new_token_id)
            if choice.want_logprobs and out.logprob is not None:
                choice.pending_logprobs.append(self._wire_logprob(out.logprob))
            # A stop token (eos, stop_token_ids) ends the choice without adding its text.
            if reason != "stop":
                added = choice.detokenizer.add(out.new_token_id)
                text = added.text
                if added.stopped:
                    reason = "stop"
        abort_sequence = None
        if reason is not None:
            if not choice.detokenizer.stopped:
                tail = choice.detokenizer.finish()
                text += tail.text
                if tail.stopped:
                    reason = "stop"
            elif out.finish_reason is None:
                abort_sequence = sequence_id(self.request_id, index)
            choice.finish_reason = reason
        if not text and reason is None:
            return OutputEvents()
        delta = GenerateDelta(
            index=index,
            text=text,
            token_ids=choice.pending_ids,
            logprobs=choice.pending_logprobs if choice.want_logprobs else None,
            finish_reason=reason,
            prompt_tokens=None if self._sent_delta else len(self.prompt_token_ids),
        )
        self._sent_delta = True
        choice.pending_ids, choice.pending_logprobs = [], []
        return OutputEvents(delta, abort_sequence)

    def _wire_logprob(self, logprob: Logprob) -> TokenLogprob:
        text, raw = self._token_texts.get(logprob.token_id)
        top = []
        for token_id, value in logprob.top:
            top_text, top_raw = self._token_texts.get(token_id)
            top.append(TopLogprob(token=top_text, logprob=value, bytes=top_raw))
        return TokenLogprob(token=text, logprob=logprob.logprob, bytes=raw, top_logprobs=top)
