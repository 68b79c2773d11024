"""Token events from the engine -> text deltas: incremental detokenization and stop strings.

Stop strings are matched on text here (the engine only knows token ids); when one matches, the
engine stream is closed, which aborts the request and frees its blocks at once. While streaming,
the last few characters are held back in case they are the start of a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator

from fleetserve.engine.types import FinishReason, GenerationRequest, SamplingParams
from fleetserve.tokenizer import Tokenizer


@dataclass
class TextDelta:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "error" on the last delta
    error: str | None = None


@dataclass
class ChoiceResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


def _finish_name(reason: FinishReason | None) -> str | None:
    if reason is None:
        return None
    return {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}.get(reason, "error")


class StopMatcher:
    """Finds the earliest stop string in text that grows at the end; says how much is safe to emit."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1

    def find(self, text: str, new_from: int) -> int:
        """Index where the first stop string starts, or -1. Only searches where a new match can be."""
        best = -1
        for s in self.stops:
            i = text.find(s, max(0, new_from - len(s) + 1))
            if i != -1 and (best == -1 or i < best):
                best = i
        return best


async def open_text_stream(engine, tokenizer: Tokenizer, request_id: str, prompt_ids: list[int],
                           sampling: SamplingParams, stops: list[str]) -> AsyncIterator[TextDelta]:
    """Submits the request now (so overload/validation errors surface before any byte is sent)."""
    events = await engine.generate(GenerationRequest(request_id, prompt_ids, sampling))
    return _text_deltas(events, tokenizer, prompt_ids, stops)


async def _text_deltas(events, tokenizer: Tokenizer, prompt_ids: list[int],
                       stops: list[str]) -> AsyncIterator[TextDelta]:
    detok = tokenizer.incremental_detokenizer(prompt_ids)
    matcher = StopMatcher(stops)
    text = ""  # all text decoded so far
    sent = 0  # characters of `text` already emitted
    pending_ids: list[int] = []
    try:
        async for ev in events:
            pending_ids.extend(ev.token_ids)
            new_from = len(text)
            text += detok.push(ev.token_ids)
            finish = _finish_name(ev.finish_reason)
            if finish is not None and finish != "error":
                text += detok.flush()
            if stops:
                at = matcher.find(text, new_from)
                if at != -1:
                    yield TextDelta(text[sent:at], pending_ids, "stop")
                    return
            if finish is not None:
                yield TextDelta(text[sent:], pending_ids, finish, ev.error)
                return
            safe = len(text) - matcher.hold if stops else len(text)
            if safe > sent:
                yield TextDelta(text[sent:safe], pending_ids)
                sent, pending_ids = safe, []
    finally:
        await events.aclose()


async def collect_text(deltas: AsyncIterator[TextDelta]) -> ChoiceResult:
    out = ChoiceResult()
    async for d in deltas:
        out.text += d.text
        out.token_ids += d.token_ids
        if d.finish_reason:
            out.finish_reason, out.error = d.finish_reason, d.error
    return out
