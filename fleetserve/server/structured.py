"""Structured output by constrained decoding (llguidance): `response_format` and forced tool calls.

A request's grammar (a JSON schema, or a Lark grammar from `tools.py`) is compiled and validated once
per request, before anything is submitted, so a bad schema is a 400 naming `response_format`. Each
choice gets its own `llguidance.LLMatcher`, wrapped in a :class:`GrammarProcessor` that the engine
runs as a logits processor: it advances the matcher by the tokens generated since its last call and
sets every token the grammar does not allow next to -inf. Once the grammar is complete only EOS is
left, so generation ends with finish_reason "stop" on a complete document. No retries, no repair.

The llguidance tokenizer (token bytes + a trie; ~0.2 s to build) is built once per `Tokenizer`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fleetserve.server.errors import APIError

if TYPE_CHECKING:
    import llguidance

    from fleetserve.tokenizer import Tokenizer

log = logging.getLogger("fleetserve.server.structured")

# JSON written under a grammar: between tokens the model may put whitespace (models were trained on
# pretty-printed JSON), but a bounded amount, so a weak model cannot spend max_tokens on blank lines.
JSON_OPTIONS: dict[str, Any] = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,24}"}


# ---- request shapes (the API contract; protocol.py uses these) ---------------------------------


class JSONSchemaSpec(BaseModel):
    """`response_format.json_schema`: OpenAI's structured outputs."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None

    @model_validator(mode="after")
    def _needs_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema object: {"name": ..., "schema": {...}}')
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f'json_schema is only allowed with type "json_schema", not "{self.type}"')
        return self

    def schema_dict(self) -> dict[str, Any] | None:
        """The JSON schema this format asks for (None for plain text)."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            assert self.json_schema is not None
            return self.json_schema.schema_ if self.json_schema.schema_ is not None else {"type": "object"}
        return None


# ---- the llguidance tokenizer, once per Tokenizer ----------------------------------------------

_LL_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LL_LOCK = threading.Lock()


def ll_tokenizer(tok: Tokenizer) -> llguidance.LLTokenizer:
    """The llguidance view of `tok` (built from its tokenizers JSON; cached per Tokenizer)."""
    import llguidance

    with _LL_LOCK:
        cached = _LL_TOKENIZERS.get(tok)
        if cached is None:
            cached = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size,
                                            eos_token=list(tok.eos_token_ids))
            _LL_TOKENIZERS[tok] = cached
        return cached


# ---- grammars ---------------------------------------------------------------------------------


def json_schema_grammar(schema: dict[str, Any]) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


def lark_grammar(lark: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(lark)


@dataclass
class Guide:
    """A validated grammar for one request; `processor()` makes the per-choice logits processor."""

    grammar: str
    ll_tok: Any  # llguidance.LLTokenizer
    eos_ids: list[int] = field(default_factory=list)

    def processor(self) -> GrammarProcessor:
        return GrammarProcessor(self)


def compile_guide(tok: Tokenizer, grammar: str, param: str, what: str) -> Guide:
    """Validates `grammar` against the tokenizer; a grammar error is a 400 naming `param`."""
    import llguidance

    try:
        ll_tok = ll_tokenizer(tok)
    except Exception as exc:  # a tokenizer llguidance cannot read: the request cannot be honoured
        raise APIError(400, f"{param} cannot be used with this model: its tokenizer is not supported by the "
                            f"grammar engine ({exc})", param, "unsupported_parameter") from exc
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll_tok)
    if is_error:
        raise APIError(400, f"{what} is invalid: {messages[0] if messages else 'unknown error'}", param,
                       "invalid_schema")
    for warning in messages:
        log.debug("grammar warning for %s: %s", param, warning)
    return Guide(grammar, ll_tok, [i for i in tok.eos_token_ids if i is not None])


def response_format_guide(tok: Tokenizer, fmt: ResponseFormat | None) -> Guide | None:
    schema = fmt.schema_dict() if fmt is not None else None
    if schema is None:
        return None
    try:
        grammar = json_schema_grammar(schema)
    except (ValueError, TypeError) as exc:
        raise APIError(400, f"response_format.json_schema.schema is invalid: {exc}", "response_format",
                       "invalid_schema") from exc
    return compile_guide(tok, grammar, "response_format", "response_format.json_schema.schema"
                         if fmt.type == "json_schema" else "response_format")


async def guide_for(tok: Tokenizer, response_format: ResponseFormat | None,
                    tool_grammar: str | None = None) -> Guide | None:
    """The request's constraint, if any: a forced tool call (Lark, from tools.py) or a response_format.

    Runs off the event loop: the first request builds the llguidance tokenizer, and big schemas take
    a while to compile.
    """
    wants_json = response_format is not None and response_format.type != "text"
    if tool_grammar is not None and wants_json:
        raise APIError(400, "response_format cannot be combined with a tool_choice that forces a tool call; "
                            "use tool_choice \"auto\" or \"none\", or leave response_format out",
                       "response_format")
    if tool_grammar is not None:
        return await asyncio.to_thread(compile_guide, tok, tool_grammar, "tools",
                                     "the parameters schema of the function tool_choice forces")
    if wants_json:
        return await asyncio.to_thread(response_format_guide, tok, response_format)
    return None


# ---- the logits processor ---------------------------------------------------------------------

_SHIFTS = torch.arange(32, dtype=torch.int32)


class GrammarProcessor:
    """`proc(output_token_ids, logits_row)`: masks what the grammar forbids next, in place.

    State is the list of output ids already fed to the matcher. The engine may call again with the
    same ids (after a preemption) or, in principle, with a different history: the matcher is rolled
    back to the common prefix and fed the rest, so it always matches `output_token_ids`.
    """

    def __init__(self, guide: Guide):
        import llguidance

        self._matcher = llguidance.LLMatcher(guide.ll_tok, guide.grammar, log_level=0)
        self._consumed: list[int] = []
        self._vocab = guide.ll_tok.vocab_size
        self._bitmask = torch.zeros((self._vocab + 31) // 32, dtype=torch.int32)
        self._eos = guide.eos_ids
        self._warned = False

    @property
    def matcher(self):
        return self._matcher

    def __call__(self, output_token_ids: list[int], logits_row: torch.Tensor) -> None:
        self._sync(output_token_ids)
        m = self._matcher
        if m.is_error():
            if not self._warned:
                log.warning("grammar matcher failed (%s); ending the choice", m.get_error())
                self._warned = True
            self._only_eos(logits_row)
            return
        if m.is_stopped():  # the document is complete: nothing but EOS may follow
            self._only_eos(logits_row)
            return
        m.unsafe_compute_mask_ptr(self._bitmask.data_ptr(), self._bitmask.numel() * 4)
        allowed = ((self._bitmask[:, None] >> _SHIFTS) & 1).view(-1).bool()
        n = min(logits_row.shape[0], self._vocab)
        logits_row[:n].masked_fill_(~allowed[:n].to(logits_row.device), float("-inf"))
        logits_row[n:] = float("-inf")  # padded vocabulary rows the tokenizer never produces

    def _only_eos(self, row: torch.Tensor) -> None:
        keep = [i for i in self._eos if i < row.shape[0]]
        saved = row[keep].clone()
        row.fill_(float("-inf"))
        row[keep] = saved

    def _sync(self, ids: list[int]) -> None:
        consumed = self._consumed
        n = len(consumed)
        if len(ids) < n or ids[:n] != consumed:
            k = 0
            for a, b in zip(ids, consumed):
                if a != b:
                    break
                k += 1
            m = self._matcher
            if m.is_error() or not m.rollback(n - k):
                m.reset()
                k = 0
            del consumed[k:]
            n = k
        new = ids[n:]
        if new:
            self._matcher.consume_tokens(new)  # a refused token leaves the matcher in its error state
            consumed.extend(new)
