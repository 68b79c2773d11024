"""Engine logprobs (token ids) -> the two OpenAI response shapes.

Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}``.
Completions (legacy): ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``;
with ``echo`` the prompt's tokens come first and the very first one has ``null`` logprob and top.

A token's text is the decoded piece of its id alone (special tokens spelled out); its ``bytes`` are the
exact UTF-8 bytes it contributes, which for a byte-level BPE piece of a multi-byte character is not a
valid string on its own (its text then shows U+FFFD, its bytes the real ones).
"""

from __future__ import annotations

import re
from functools import lru_cache

from tokenizers import decoders

from fleetserve.engine.types import TokenLogprob
from fleetserve.tokenizer import Tokenizer, _byte_alphabet

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece byte fallback


class TokenTexts:
    """Text and bytes of single token ids, cached per tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        backend = tokenizer.backend
        self._byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        self._unbyte = {c: b for b, c in _byte_alphabet().items()}
        self._added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self.text = lru_cache(maxsize=65536)(self._text)
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)

    def _bytes(self, token_id: int) -> list[int]:
        if token_id in self._added:
            return list(self._added[token_id].encode("utf-8"))
        piece = self.tok.backend.id_to_token(token_id) or ""
        if self._byte_level and piece and all(c in self._unbyte for c in piece):
            return [self._unbyte[c] for c in piece]
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            return [int(m.group(1), 16)]
        return list(self._text(token_id).encode("utf-8"))


_CACHE: dict[int, TokenTexts] = {}


def token_texts(tokenizer: Tokenizer) -> TokenTexts:
    tt = _CACHE.get(id(tokenizer))
    if tt is None or tt.tok is not tokenizer:
        tt = _CACHE[id(tokenizer)] = TokenTexts(tokenizer)
    return tt


def _entry(tt: TokenTexts, token_id: int, logprob: float) -> dict:
    return {"token": tt.text(token_id), "logprob": logprob, "bytes": tt.bytes(token_id)}


def chat_logprobs(lps: list[TokenLogprob] | None, tokenizer: Tokenizer) -> dict:
    """OpenAI chat `logprobs` for the given tokens (top_logprobs has the k the engine was asked for)."""
    tt = token_texts(tokenizer)
    return {"content": [{**_entry(tt, lp.token_id, lp.logprob),
                         "top_logprobs": [_entry(tt, i, v) for i, v in lp.top]} for lp in lps or []],
            "refusal": None}


def completion_logprobs(token_ids: list[int], lps: list[TokenLogprob | None], tokenizer: Tokenizer,
                        text_offset: int = 0) -> dict:
    """Legacy completions `logprobs` for `token_ids`; a `None` in `lps` (the first prompt token) gives null
    logprob and top.

    `top_logprobs` maps the top k tokens' text to their logprobs and always includes the chosen token (as
    OpenAI and vLLM do), so it may hold k + 1 entries. `text_offset`: where each token's text starts in the
    choice's text, token texts laid end to end from `text_offset`.
    """
    tt = token_texts(tokenizer)
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = text_offset
    for token_id, lp in zip(token_ids, lps, strict=True):
        text = tt.text(token_id)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if lp is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        top = {tt.text(i): v for i, v in lp.top}
        top.setdefault(text, lp.logprob)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append(top)
    return out


def concat_completion_logprobs(parts: list[dict]) -> dict:
    return {k: [v for p in parts for v in p[k]] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
