"""`/v1/chat/completions`, `/v1/completions`, `/v1/models`: the OpenAI surface of a worker."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from fleetserve.engine.native.engine import EngineUnavailable
from fleetserve.engine.types import EngineOverloaded, RequestRejected, SamplingParams
from fleetserve.server import structured, tools
from fleetserve.server.errors import APIError, sse_error
from fleetserve.server.generation import run_until_disconnected, ChoiceResult, TextDelta, collect_text, open_text_stream
from fleetserve.server.logprobs import chat_logprobs, completion_logprobs
from fleetserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingFields,
    new_id,
)
from fleetserve.server.state import WorkerState, get_state

router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models", response_model=ModelList)
async def list_models(state: WorkerState = Depends(get_state)) -> ModelList:
    return ModelList(data=[ModelCard(id=state.served_model_name, root=state.model_files.name,
                                     max_model_len=state.engine.max_model_len if state.engine else None,
                                     created=int(state.started_at))])


def _check_model(req: SamplingFields, state: WorkerState) -> None:
    if req.model is not None and req.model != state.served_model_name:
        raise APIError(404, f"the model '{req.model}' does not exist; this server serves "
                            f"'{state.served_model_name}'", "model", "model_not_found")
    unsupported = req.unsupported_field()
    if unsupported is not None:
        raise APIError(400, unsupported[1], unsupported[0], "unsupported_parameter")


def vocab_size(engine, tok) -> int:
    """Size of the model's logits row (what token ids in logit_bias are checked against)."""
    cfg = getattr(engine, "model_cfg", None)
    return cfg.vocab_size if cfg is not None else tok.vocab_size


def _check_sampling(req: SamplingFields, engine, tok) -> None:
    """The checks that need the model or span fields (400 naming the field, like schema errors)."""
    vocab = vocab_size(engine, tok)
    bad = next((i for i in req.logit_bias_ids() if i >= vocab), None)
    if bad is not None:
        raise APIError(400, f"logit_bias: token id {bad} is out of range; this model's vocabulary has {vocab} "
                            f"tokens (ids 0..{vocab - 1})", "logit_bias")
    bad = next((i for i in req.stop_token_ids or () if not 0 <= i < vocab), None)
    if bad is not None:  # would index outside the logits row (min_tokens bans stop ids) and fail the engine step
        raise APIError(400, f"stop_token_ids: token id {bad} is out of range; this model's vocabulary has {vocab} "
                            f"tokens (ids 0..{vocab - 1})", "stop_token_ids")
    if isinstance(req, ChatCompletionRequest) and req.top_logprobs and not req.logprobs:
        raise APIError(400, f"top_logprobs ({req.top_logprobs}) requires logprobs to be true", "top_logprobs")
    if isinstance(req, CompletionRequest) and req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens: 0 is only allowed with echo true (to score the prompt without "
                            "generating); otherwise ask for at least 1 token", "max_tokens")


def _ready(state: WorkerState):
    if state.engine is None or state.tokenizer is None:
        raise APIError(503, "the model is still loading; retry when /readyz answers 200",
                       headers={"Retry-After": "5"})
    return state.engine, state.tokenizer


def _sampling(req: SamplingFields, max_tokens: int, eos_stop: list[int], seed_offset: int) -> SamplingParams:
    top_k = req.top_k if req.top_k and req.top_k > 0 else 0
    return SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=top_k,
        min_p=req.min_p or 0.0,
        seed=None if req.seed is None else req.seed + seed_offset,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        stop_token_ids=list(req.stop_token_ids or []) + eos_stop,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=req.logit_bias_ids(),
        logprobs=req.logprobs_k(),
        prompt_logprobs=req.logprobs if isinstance(req, CompletionRequest) and req.echo else None,
    )


def _max_tokens(requested: int | None, prompt_len: int, max_model_len: int, param: str, prompt_param: str) -> int:
    room = max_model_len - prompt_len
    if room <= 0:
        raise APIError(400, f"this model's maximum context length is {max_model_len} tokens, but the prompt "
                            f"has {prompt_len} tokens", prompt_param, "context_length_exceeded")
    if requested is None:
        return room
    if requested > room:
        raise APIError(400, f"this model's maximum context length is {max_model_len} tokens; the prompt has "
                            f"{prompt_len} tokens and {param} asks for {requested} more "
                            f"({prompt_len + requested} in total)", param, "context_length_exceeded")
    return requested


async def _open_choices(state: WorkerState, rid: str, prompts: list[list[int]], req: SamplingFields,
                        max_tokens: list[int], guide: structured.Guide | None = None
                        ) -> list[AsyncIterator[TextDelta]]:
    """Submits every choice before responding, so 429/400/503 come back as HTTP statuses.
    `guide`: the request's grammar (response_format / forced tool call); each choice gets its own matcher."""
    engine, tok = _ready(state)
    streams = []
    try:
        for i, ids in enumerate(prompts):
            for j in range(req.n):
                idx = i * req.n + j
                sp = _sampling(req, max_tokens[i], [], idx)
                if guide is not None:
                    sp.logits_processors.append(guide.processor())
                streams.append(await open_text_stream(engine, tok, f"{rid}-{idx}", ids, sp, req.stop or []))
    except EngineOverloaded as exc:
        await _close(streams)
        raise APIError(429, f"server overloaded: {exc}; retry later", headers={"Retry-After": "1"}) from exc
    except EngineUnavailable as exc:
        await _close(streams)
        raise APIError(503, f"not accepting requests: {exc}", headers={"Retry-After": "5"}) from exc
    except RequestRejected as exc:
        await _close(streams)
        raise APIError(400, str(exc), "messages" if isinstance(req, ChatCompletionRequest) else "prompt") from exc
    return streams


async def _close(streams: list[AsyncIterator[TextDelta]]) -> None:
    for s in streams:
        await s.aclose()


async def _merge(streams: list[AsyncIterator[TextDelta]]) -> AsyncIterator[tuple[int, TextDelta]]:
    """Interleaves n choice streams as their deltas arrive; cancelling the consumer aborts them all."""
    if len(streams) == 1:
        async for d in streams[0]:
            yield 0, d
        return
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, s: AsyncIterator[TextDelta]) -> None:
        try:
            async for d in s:
                await q.put((i, d))
        finally:
            await q.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, d = await q.get()
            if d is done:
                remaining -= 1
            else:
                yield i, d
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _gather(streams: list[AsyncIterator[TextDelta]], request: Request) -> list[ChoiceResult]:
    return await run_until_disconnected([collect_text(s) for s in streams], request, lambda: APIError(
        499, "the client closed the connection before the response was ready"))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _raise_on_error(results: list[ChoiceResult]) -> None:
    failed = next((r for r in results if r.finish_reason == "error"), None)
    if failed is not None:
        raise APIError(500, failed.error or "generation failed")


# ---- chat ------------------------------------------------------------------------------------


@router.post("/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request, state: WorkerState = Depends(get_state)):
    _check_model(req, state)
    engine, tok = _ready(state)
    _check_sampling(req, engine, tok)
    plan = tools.plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, tok.chat_template)
    messages = tools.template_messages(req.messages)
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True,
                                       tools=plan.template_tools if plan else None)
    except Exception as exc:  # template errors are the request's fault (e.g. roles out of order)
        raise APIError(400, f"could not apply the chat template: {exc}", "messages") from exc
    prompt = tok.encode(text, add_special_tokens=False)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = _max_tokens(req.token_limit(), len(prompt), engine.max_model_len, param, "messages")
    rid, created, model = new_id("chatcmpl"), int(time.time()), state.served_model_name
    guide = await structured.guide_for(tok, req.response_format, plan.grammar if plan else None)
    streams = await _open_choices(state, rid, [prompt], req, [max_tokens], guide)
    if plan is not None and req.stream:
        streams = [tools.stream_tool_calls(s) for s in streams]
    if req.stream:
        usage_on = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_chat_stream(streams, rid, created, model, len(prompt), req.n, usage_on,
                                              tok if req.logprobs else None),
                                 media_type="text/event-stream")
    results = await _gather(streams, request)
    _raise_on_error(results)
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": i, **tools.chat_output(r, plan),
                     "logprobs": chat_logprobs(r.logprobs, tok) if req.logprobs else None}
                    for i, r in enumerate(results)],
        "usage": _usage(len(prompt), sum(len(r.token_ids) for r in results)),
    })


async def _chat_stream(streams, rid: str, created: int, model: str, prompt_tokens: int, n: int,
                       usage_on: bool, lp_tok=None) -> AsyncIterator[str]:
    """`lp_tok`: the tokenizer when logprobs were asked for; each chunk's logprobs cover that chunk's tokens."""
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    extra = {"usage": None} if usage_on else {}
    completion_tokens = 0
    try:
        for i in range(n):
            yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}], **extra})
        async for i, d in _merge(streams):
            completion_tokens += len(d.token_ids)
            if d.finish_reason == "error":
                yield sse_error(d.error or "generation failed")
                continue
            lp = chat_logprobs(d.logprobs, lp_tok) if lp_tok is not None and d.token_ids else None
            if d.text or getattr(d, "tool_calls", None):
                yield _sse({**base, "choices": [{"index": i, "delta": tools.chat_delta(d), "logprobs": lp,
                                                 "finish_reason": None}], **extra})
                lp = None
            if d.finish_reason:
                yield _sse({**base, "choices": [{"index": i, "delta": {}, "logprobs": lp,
                                                 "finish_reason": d.finish_reason}], **extra})
        if usage_on:
            yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    except Exception as exc:  # mid-stream failure: tell the client in-band, then end the stream
        yield sse_error(f"generation failed: {exc}")
    yield "data: [DONE]\n\n"


# ---- completions -----------------------------------------------------------------------------


def _completion_prompts(req: CompletionRequest, tok) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str):
        return [tok.encode(p)]
    if isinstance(p[0], int):
        return [list(p)]
    if isinstance(p[0], list):
        return [list(x) for x in p]
    return [tok.encode(x) for x in p]


def _echo_texts(req: CompletionRequest, prompts: list[list[int]], tok) -> list[str]:
    """The prompt text each choice starts with under `echo` (token-id prompts are decoded)."""
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if isinstance(p[0], str):
        return list(p)
    return [tok.decode(ids) for ids in prompts]


def _completion_choice_logprobs(prompt_ids: list[int], echo_text: str | None, token_ids: list[int],
                                lps, prompt_lps, tok) -> dict:
    """Legacy logprobs of one choice: the echoed prompt's tokens (first one null) then the generated ones."""
    if echo_text is None:
        return completion_logprobs(token_ids, lps or [], tok)
    head = completion_logprobs(prompt_ids, prompt_lps or [None] * len(prompt_ids), tok)
    tail = completion_logprobs(token_ids, lps or [], tok, text_offset=len(echo_text))
    return {k: head[k] + tail[k] for k in head}


@router.post("/completions")
async def completions(req: CompletionRequest, request: Request, state: WorkerState = Depends(get_state)):
    _check_model(req, state)
    engine, tok = _ready(state)
    _check_sampling(req, engine, tok)
    prompts = _completion_prompts(req, tok)
    for ids in prompts:
        try:
            engine.validate(ids)
        except RequestRejected as exc:
            raise APIError(400, str(exc), "prompt") from exc
    max_tokens = [_max_tokens(req.token_limit(), len(ids), engine.max_model_len, "max_tokens", "prompt")
                  for ids in prompts]
    rid, created, model = new_id("cmpl"), int(time.time()), state.served_model_name
    guide = await structured.guide_for(tok, req.response_format)
    streams = await _open_choices(state, rid, prompts, req, max_tokens, guide)
    prompt_tokens = sum(len(p) for p in prompts)
    # per choice (prompt i, sample j -> choice i * n + j): its prompt ids and, under echo, its prompt text
    choice_prompts = [ids for ids in prompts for _ in range(req.n)]
    echoes = [t for t in _echo_texts(req, prompts, tok) for _ in range(req.n)] if req.echo else None
    lp_tok = tok if req.logprobs is not None else None
    if req.stream:
        usage_on = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_completion_stream(streams, rid, created, model, prompt_tokens, usage_on,
                                                    choice_prompts, echoes, lp_tok),
                                 media_type="text/event-stream")
    results = await _gather(streams, request)
    _raise_on_error(results)
    choices = []
    for i, r in enumerate(results):
        echo = echoes[i] if echoes else None
        lps = None if lp_tok is None else _completion_choice_logprobs(
            choice_prompts[i], echo, r.token_ids, r.logprobs, r.prompt_logprobs, tok)
        choices.append({"index": i, "text": (echo or "") + r.text, "logprobs": lps,
                        "finish_reason": r.finish_reason})
    return JSONResponse({
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": choices,
        "usage": _usage(prompt_tokens, sum(len(r.token_ids) for r in results)),
    })


async def _completion_stream(streams, rid: str, created: int, model: str, prompt_tokens: int, usage_on: bool,
                             choice_prompts: list[list[int]], echoes: list[str] | None,
                             lp_tok=None) -> AsyncIterator[str]:
    """Under echo, a choice's first chunk starts with its prompt text (and the prompt tokens' logprobs)."""
    base = {"id": rid, "object": "text_completion", "created": created, "model": model}
    extra = {"usage": None} if usage_on else {}
    completion_tokens = 0
    offsets = [0] * len(streams)  # characters of each choice's text sent so far (for text_offset)
    echoed = [echoes is None] * len(streams)
    try:
        async for i, d in _merge(streams):
            completion_tokens += len(d.token_ids)
            if d.finish_reason == "error":
                yield sse_error(d.error or "generation failed")
                continue
            echo = None if echoed[i] else echoes[i]
            echoed[i] = True
            text = (echo or "") + d.text
            lps = None
            if lp_tok is not None and (echo is not None or d.token_ids):
                lps = _completion_choice_logprobs(choice_prompts[i], echo, d.token_ids, d.logprobs,
                                                  d.prompt_logprobs, lp_tok)
                lps["text_offset"] = [offsets[i] + o for o in lps["text_offset"]]
            offsets[i] += len(text)
            if text or d.finish_reason:
                yield _sse({**base, "choices": [{"index": i, "text": text, "logprobs": lps,
                                                 "finish_reason": d.finish_reason}], **extra})
        if usage_on:
            yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    except Exception as exc:
        yield sse_error(f"generation failed: {exc}")
    yield "data: [DONE]\n\n"
