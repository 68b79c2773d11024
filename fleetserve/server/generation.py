"""Token events from the engine -> text deltas: incremental detokenization and stop strings.

Stop strings are matched on text here (the engine only knows token ids); when one matches, the
engine stream is closed, which aborts the request and frees its blocks at once. While streaming,
the last few characters are held back in case they are the start of a stop string; the tokens (and
their logprobs) behind held-back text travel with the delta that finally carries it, so every delta's
logprobs cover exactly its `token_ids`.
"""

from __future__ import annotations

import asyncio

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fleetserve.engine.types import FinishReason, GenerationRequest, SamplingParams, TokenLogprob
from fleetserve.tokenizer import Tokenizer


@dataclass
class TextDelta:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "error" on the last delta
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first delta, when asked for


@dataclass
class ChoiceResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


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
    pending_lps: list[TokenLogprob] | None = None
    prompt_lps: list[TokenLogprob | None] | None = None  # until the first delta goes out

    def delta(text_: str, finish: str | None = None, error: str | None = None) -> TextDelta:
        nonlocal prompt_lps
        d = TextDelta(text_, pending_ids, finish, error, pending_lps, prompt_lps)
        prompt_lps = None
        return d

    try:
        async for ev in events:
            if ev.prompt_logprobs is not None:
                prompt_lps = ev.prompt_logprobs
            # An event may carry several tokens (speculative decoding): with stop strings each is checked on its
            # own, so no token after the one completing a stop string is counted or returned.
            ids = ev.token_ids
            pieces = [ids[i : i + 1] for i in range(len(ids))] if stops and len(ids) > 1 else [ids]
            for j, piece in enumerate(pieces):
                pending_ids.extend(piece)
                if ev.logprobs is not None:
                    pending_lps = pending_lps if pending_lps is not None else []
                    pending_lps.extend(ev.logprobs[j : j + 1] if len(pieces) > 1 else ev.logprobs)
                new_from = len(text)
                text += detok.push(piece)
                finish = _finish_name(ev.finish_reason) if j == len(pieces) - 1 else None
                if finish is not None and finish != "error":
                    text += detok.flush()
                if stops:
                    at = matcher.find(text, new_from)
                    if at != -1:
                        yield delta(text[sent:at], "stop")
                        return
                if finish is not None:
                    yield delta(text[sent:], finish, ev.error)
                    return
                safe = len(text) - matcher.hold if stops else len(text)
                if safe > sent:
                    yield delta(text[sent:safe])
                    sent, pending_ids, pending_lps = safe, [], None
    finally:
        await events.aclose()


async def collect_text(deltas: AsyncIterator[TextDelta]) -> ChoiceResult:
    out = ChoiceResult()
    async for d in deltas:
        out.text += d.text
        out.token_ids += d.token_ids
        if d.logprobs is not None:
            out.logprobs = out.logprobs if out.logprobs is not None else []
            out.logprobs.extend(d.logprobs)
        if d.prompt_logprobs is not None:
            out.prompt_logprobs = d.prompt_logprobs
        if d.finish_reason:
            out.finish_reason, out.error = d.finish_reason, d.error
    return out


async def run_until_disconnected(coros: list, request, gone_error) -> list:
    """Runs request work to completion, cancelling it (which aborts its engine requests) if the client goes
    away first; then raises `gone_error()` (a 499 nobody reads) instead of letting a CancelledError escape to
    the server as an "Exception in ASGI application". A cancellation of this task itself propagates."""
    work = asyncio.gather(*coros)
    gone = False

    async def watch() -> None:
        nonlocal gone
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        gone = True
        work.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        raise gone_error() from None
    finally:
        watcher.cancel()
