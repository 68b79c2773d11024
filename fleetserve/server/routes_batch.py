"""The batch API (`/generate`, `/loglikelihood`, seed 004) and the tokenizer routes (`/tokenize`,
`/detokenize`, `/tokenizer_info`, as vLLM and SGLang offer them; lm-evaluation-harness's remote tokenizer
uses them).

Every prompt of a batch goes to the engine at once as its own request, so continuous batching runs them
together; results come back in the order of the prompts. A loglikelihood is a prompt-only engine request
(`max_tokens=0`) asking for prompt logprobs: one forward over prompt + continuation, scored from the
model's raw distribution.

Errors (DESIGN.md): FastAPI's 422 `detail` for schema errors, the configurable caps included (batch size,
`max_tokens`); 400 `{"detail"}` for semantic ones (context overflow, token ids out of range); 429 / 503
with Retry-After when the engine is full / not ready.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException

from fleetserve.engine.native.engine import EngineUnavailable
from fleetserve.engine.types import (
    EngineOverloaded,
    GenerationRequest,
    RequestRejected,
    SamplingParams,
    TokenLogprob,
)
from fleetserve.server.generation import collect_text, open_text_stream, run_until_disconnected
from fleetserve.server.protocol import ChatMessage, Usage, new_id
from fleetserve.server.state import WorkerState, get_state

router = APIRouter(tags=["batch"])

# Caps, overridable per app (`app.state.batch_limits = BatchLimits(...)`) or by ServeConfig fields of the
# same names once they exist (max_batch_size, max_new_tokens, max_request_tokens).
DEFAULT_MAX_BATCH_SIZE = 64  # prompts per /generate or /loglikelihood request
DEFAULT_MAX_NEW_TOKENS = 1024  # the largest /generate max_tokens
DEFAULT_MAX_REQUEST_TOKENS = 131072  # prompt + new tokens, summed over one request's prompts
MAX_STOPS = 4


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS

    @classmethod
    def from_config(cls, cfg: Any) -> BatchLimits:
        def pick(name: str, default: int) -> int:
            value = getattr(cfg, name, None)
            return default if value is None else int(value)

        return cls(pick("max_batch_size", DEFAULT_MAX_BATCH_SIZE), pick("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
                   pick("max_request_tokens", DEFAULT_MAX_REQUEST_TOKENS))


def get_limits(request: Request) -> BatchLimits:
    limits = getattr(request.app.state, "batch_limits", None)
    return limits if limits is not None else BatchLimits.from_config(get_state(request).config)


StateDep = Annotated[WorkerState, Depends(get_state)]
LimitsDep = Annotated[BatchLimits, Depends(get_limits)]


# ---- contract --------------------------------------------------------------------------------

NonEmptyStr = Annotated[str, Field(min_length=1)]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[NonEmptyStr] = Field(min_length=1, description="1 to max_batch_size (default 64) prompts")
    max_tokens: int = Field(128, ge=1, description="new tokens per prompt, 1 to max_new_tokens (default 1024)")
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="same seed + same prompt = same completion")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOPS} stop strings")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        v = [] if v is None else [v] if isinstance(v, str) else v
        if len(v) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings are allowed, got {len(v)}")
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v


class GenerateResponse(BaseModel):
    completions: list[str]
    usage: Usage


class LoglikelihoodRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(min_length=1, description="contexts ('' scores from the BOS token)")
    continuations: list[str] = Field(min_length=1, description="one per prompt")

    @model_validator(mode="after")
    def _same_length(self) -> LoglikelihoodRequest:
        if len(self.prompts) != len(self.continuations):
            raise ValueError(f"prompts and continuations must have the same length, got {len(self.prompts)} "
                             f"prompts and {len(self.continuations)} continuations")
        return self


class LoglikelihoodResponse(BaseModel):
    ll: list[float] = Field(description="sum of the continuation tokens' log-probabilities given the prompt")
    is_greedy: list[bool] = Field(description="every continuation token is the model's most likely one")


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = Field(None, description="default: true for prompt, false for messages")
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt (text) or messages (chat, the template is applied)")
        return self


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


# ---- helpers ---------------------------------------------------------------------------------


def _schema_error(field: str, message: str, value: Any, kind: str = "value_error") -> RequestValidationError:
    """A 422 shaped exactly like FastAPI's own, for limits that are only known at run time."""
    return RequestValidationError([{"type": kind, "loc": ("body", field), "msg": message, "input": value}])


def _ready(state: WorkerState):
    if state.engine is None or state.tokenizer is None:
        raise HTTPException(503, "the model is still loading; retry when /readyz answers 200",
                            headers={"Retry-After": "5"})
    return state.engine, state.tokenizer


def _check_batch(n: int, limits: BatchLimits) -> None:
    if n > limits.max_batch_size:
        raise _schema_error("prompts", f"at most {limits.max_batch_size} prompts per request are allowed, "
                                       f"got {n}; split the batch", n, "too_long")


def _check_request_tokens(total: int, limits: BatchLimits) -> None:
    if total > limits.max_request_tokens:
        raise HTTPException(400, f"this request needs {total} tokens (prompts plus new tokens); at most "
                                 f"{limits.max_request_tokens} are allowed per request; split the batch")


async def _open_all(openers: list[Callable[[], Awaitable[AsyncIterator]]]) -> list[AsyncIterator]:
    """Submits every request before any work is awaited, so a full queue or a loading engine is a status."""
    streams: list[AsyncIterator] = []
    try:
        for open_ in openers:
            streams.append(await open_())
    except (EngineOverloaded, EngineUnavailable, RequestRejected) as exc:
        await _close(streams)
        if isinstance(exc, EngineOverloaded):
            raise HTTPException(429, f"server overloaded: {exc}; retry later", headers={"Retry-After": "1"}) from exc
        if isinstance(exc, EngineUnavailable):
            raise HTTPException(503, f"not accepting requests: {exc}", headers={"Retry-After": "5"}) from exc
        raise HTTPException(400, str(exc)) from exc
    return streams


async def _close(streams: list[AsyncIterator]) -> None:
    for s in streams:
        await s.aclose()


async def _run_all(coros: list[Awaitable], streams: list[AsyncIterator], request: Request) -> list:
    """Runs the per-prompt coroutines together; if the client goes away first, aborts them all."""
    try:
        return await run_until_disconnected(coros, request, lambda: HTTPException(
            499, "the client closed the connection before the response was ready"))
    finally:
        await _close(streams)  # frees the engine's blocks of anything unfinished at once


def _bos_prefix(tok) -> list[int]:
    """[BOS] when the tokenizer's own framing starts a text with it, else []."""
    bos = tok.bos_token_id
    return [bos] if bos is not None and tok.encode("a")[:1] == [bos] else []


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) exactly as lm-evaluation-harness splits them.

    Trailing whitespace of the context moves onto the continuation; the pair is encoded as one string and
    the continuation's tokens are those after the context's own encoding. An empty context becomes the
    BOS token (EOS when the model has none), so the first continuation token is scored too.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    prefix = _bos_prefix(tok)
    if not context:
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        return [start], tok.encode(continuation, add_special_tokens=False)
    context_enc = prefix + tok.encode(context, add_special_tokens=False)
    whole_enc = prefix + tok.encode(context + continuation, add_special_tokens=False)
    return context_enc, whole_enc[len(context_enc):]


async def _prompt_logprobs(events: AsyncIterator) -> list[TokenLogprob | None]:
    out: list[TokenLogprob | None] | None = None
    async for ev in events:
        if ev.error:
            raise HTTPException(500, f"scoring failed: {ev.error}")
        if ev.prompt_logprobs is not None:
            out = ev.prompt_logprobs
    if out is None:
        raise HTTPException(500, "scoring failed: the engine returned no prompt logprobs")
    return out


# ---- routes ----------------------------------------------------------------------------------


@router.post("/generate", response_model=GenerateResponse, summary="Complete a batch of prompts")
async def generate(req: GenerateRequest, request: Request, state: StateDep,
                   limits: LimitsDep) -> GenerateResponse:
    _check_batch(len(req.prompts), limits)
    if req.max_tokens > limits.max_new_tokens:
        raise _schema_error("max_tokens", f"max_tokens must be at most {limits.max_new_tokens}, got "
                                          f"{req.max_tokens}", req.max_tokens, "less_than_equal")
    engine, tok = _ready(state)
    prompts = [tok.encode(p) for p in req.prompts]
    window = engine.max_model_len
    for i, ids in enumerate(prompts):
        if len(ids) + req.max_tokens > window:
            raise HTTPException(400, f"prompts[{i}] has {len(ids)} tokens and max_tokens is {req.max_tokens} "
                                     f"({len(ids) + req.max_tokens} in total); this model's context window is "
                                     f"{window} tokens")
    _check_request_tokens(sum(len(ids) + req.max_tokens for ids in prompts), limits)
    rid = new_id("gen")
    sampling = [SamplingParams(temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                               max_tokens=req.max_tokens) for _ in prompts]
    streams = await _open_all([
        (lambda i=i, ids=ids: open_text_stream(engine, tok, f"{rid}-{i}", ids, sampling[i], req.stop or []))
        for i, ids in enumerate(prompts)])
    results = await _run_all([collect_text(s) for s in streams], streams, request)
    failed = next((r for r in results if r.finish_reason == "error"), None)
    if failed is not None:
        raise HTTPException(500, f"generation failed: {failed.error}")
    prompt_tokens = sum(len(ids) for ids in prompts)
    completion_tokens = sum(len(r.token_ids) for r in results)
    return GenerateResponse(completions=[r.text for r in results],
                            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                        total_tokens=prompt_tokens + completion_tokens))


@router.post("/loglikelihood", response_model=LoglikelihoodResponse,
             summary="Score continuations: summed log-probability given each prompt, and whether it is greedy")
async def loglikelihood(req: LoglikelihoodRequest, request: Request, state: StateDep,
                        limits: LimitsDep) -> LoglikelihoodResponse:
    _check_batch(len(req.prompts), limits)
    engine, tok = _ready(state)
    pairs = [encode_pair(tok, c, x) for c, x in zip(req.prompts, req.continuations)]
    seqs = [ctx + cont for ctx, cont in pairs]
    for i, seq in enumerate(seqs):
        try:
            engine.validate(seq)
        except RequestRejected as exc:
            raise HTTPException(400, f"prompts[{i}] + continuations[{i}]: {exc}") from exc
    _check_request_tokens(sum(len(s) for s in seqs), limits)
    rid = new_id("ll")
    scored = [i for i, (_, cont) in enumerate(pairs) if cont]  # an empty continuation scores 0, greedy
    streams = await _open_all([  # prompt-only requests: compute prompt + continuation once, score every position
        (lambda i=i: engine.generate(GenerationRequest(
            f"{rid}-{i}", seqs[i], SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=0))))
        for i in scored])
    results = await _run_all([_prompt_logprobs(s) for s in streams], streams, request)
    ll, greedy = [0.0] * len(pairs), [True] * len(pairs)
    for i, lps in zip(scored, results):
        tail = lps[len(pairs[i][0]):]  # the continuation's positions (the first prompt position is None)
        ll[i] = sum(lp.logprob for lp in tail)
        greedy[i] = all(lp.rank == 1 for lp in tail)
    return LoglikelihoodResponse(ll=ll, is_greedy=greedy)


@router.post("/tokenize", response_model=TokenizeResponse, response_model_exclude_none=True,
             summary="Token ids of a text, or of chat messages with the model's chat template applied")
async def tokenize(req: TokenizeRequest, state: StateDep) -> TokenizeResponse:
    engine, tok = _ready(state)
    if req.messages is not None:
        try:
            text = tok.apply_chat_template([{"role": m.role, "content": m.text(),
                                             **({"name": m.name} if m.name else {})} for m in req.messages],
                                           add_generation_prompt=req.add_generation_prompt)
        except Exception as exc:  # template errors are the request's fault
            raise HTTPException(400, f"could not apply the chat template: {exc}") from exc
        ids = tok.encode(text, add_special_tokens=bool(req.add_special_tokens))
    else:
        ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.max_model_len,
                            token_strs=[tok.id_to_token(i) for i in ids] if req.return_token_strs else None)


@router.post("/detokenize", response_model=DetokenizeResponse, summary="The text of token ids")
async def detokenize(req: DetokenizeRequest, state: StateDep) -> DetokenizeResponse:
    _, tok = _ready(state)
    bad = next((i for i in req.tokens if i >= tok.vocab_size), None)
    if bad is not None:
        raise HTTPException(400, f"token id {bad} is out of range; valid ids are 0..{tok.vocab_size - 1}")
    return DetokenizeResponse(prompt=tok.decode(req.tokens))


@router.get("/tokenizer_info", summary="Special tokens, chat template and sizes of this model's tokenizer")
async def tokenizer_info(state: StateDep) -> dict:
    engine, tok = _ready(state)
    return {"model": state.served_model_name, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
            "pad_token": tok.pad_token, "unk_token": tok.unk_token, "chat_template": tok.chat_template,
            "vocab_size": tok.vocab_size, "max_model_len": engine.max_model_len}
