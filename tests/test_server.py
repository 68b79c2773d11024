"""The worker HTTP server end to end: the real app under uvicorn on a loopback port, the real native
engine on the embedded SmolLM2-135M model, and the official `openai` client (httpx for raw checks)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from fleetserve.config import ServeConfig
from fleetserve.models import resolve_model
from fleetserve.server.app import create_app, new_state
from fleetserve.server.state import WorkerState
from tests.net import free_port, serve_in_thread

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
PARIS = "The capital of France is Paris."
STORY = "Once upon a time"



@dataclass
class Live:
    url: str
    name: str
    state: WorkerState
    engine: object
    tokenizer: object

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def live(default_engine, tokenizer):
    """The real app (shared session engine) served by uvicorn in a background thread."""
    state = new_state(ServeConfig(), resolve_model("default", download=False))
    state.engine, state.tokenizer = default_engine, tokenizer
    with serve_in_thread(create_app(state, load=False)) as url:
        yield Live(url, state.served_model_name, state, default_engine, tokenizer)


def wait_idle(engine, timeout: float = 10.0) -> None:
    """Until the engine has nothing running or waiting and every KV block is free again."""
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if s.running == 0 and s.waiting == 0 and engine.block_manager.num_used == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle after {timeout}s: running={s.running} waiting={s.waiting} "
                                 f"blocks used={engine.block_manager.num_used}")
        time.sleep(0.05)


def sse(url: str, body: dict, timeout: float = 60) -> list[dict]:
    """POSTs a streaming request and returns its parsed events; checks the raw framing on the way."""
    with httpx.Client(timeout=timeout) as c, c.stream("POST", url, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    assert lines.count("data: [DONE]") == 1
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def assert_openai_error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["param"] == param
    return err


# ---- chat ------------------------------------------------------------------------------------


def test_chat_greedy_answer_and_usage(live):
    """A user asking the default model a simple question gets the reference answer in OpenAI's exact shape."""
    r = live.client.chat.completions.create(model=live.name, messages=FRANCE, temperature=0)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-") and len(r.id) > len("chatcmpl-")
    assert r.model == live.name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert isinstance(r.created, int) and abs(r.created - time.time()) < 120
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == PARIS
    assert choice.finish_reason == "stop"

    tok = live.tokenizer
    prompt = tok.encode(tok.apply_chat_template(FRANCE, add_generation_prompt=True), add_special_tokens=False)
    answer = tok.encode(PARIS, add_special_tokens=False)
    assert r.usage.prompt_tokens == len(prompt)
    # every generated token is counted, the EOS that ended the answer included
    assert r.usage.completion_tokens == len(answer) + 1 == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_without_model_field_uses_the_served_model(live):
    """`model` may be left out: a worker serves one model."""
    r = httpx.post(f"{live.url}/v1/chat/completions", json={"messages": FRANCE, "temperature": 0}, timeout=60)
    assert r.status_code == 200
    assert r.json()["model"] == live.name
    assert r.json()["choices"][0]["message"]["content"] == PARIS


def test_models_list(live):
    """`client.models.list()` shows the served name and context length."""
    models = live.client.models.list()
    assert [m.id for m in models.data] == [live.name]
    assert models.data[0].object == "model"
    raw = httpx.get(f"{live.url}/v1/models").json()
    assert raw["object"] == "list"
    assert raw["data"][0]["max_model_len"] == live.engine.max_model_len


def test_chat_streaming_matches_non_streaming(live):
    """Streamed deltas add up to the non-streamed answer; role first, one finish chunk, usage last if asked."""
    full = live.client.chat.completions.create(model=live.name, messages=FRANCE, temperature=0)
    chunks = list(live.client.chat.completions.create(model=live.name, messages=FRANCE, temperature=0,
                                                      stream=True, stream_options={"include_usage": True}))
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == live.name for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *content_chunks, usage_chunk = chunks
    assert usage_chunk.choices == []
    assert usage_chunk.usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in content_chunks)
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == full.choices[0].message.content == PARIS
    finishes = [c.choices[0].finish_reason for c in content_chunks if c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert content_chunks[-1].choices[0].finish_reason == "stop"

    # raw SSE, no usage requested: every event has a choice, the stream ends with [DONE]
    events = sse(f"{live.url}/v1/chat/completions", {"messages": FRANCE, "temperature": 0, "stream": True})
    assert all(len(e["choices"]) == 1 and "usage" not in e for e in events)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == PARIS
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"]] == ["stop"]


# ---- completions -----------------------------------------------------------------------------


def test_completions_prompt_forms(live):
    """A string, a list of strings, token ids and lists of token ids all work; one choice per prompt, in order."""
    c, tok = live.client, live.tokenizer
    second = "The best way to learn"
    a = c.completions.create(model=live.name, prompt=STORY, temperature=0, max_tokens=8)
    b = c.completions.create(model=live.name, prompt=second, temperature=0, max_tokens=8)
    assert a.object == "text_completion" and a.id.startswith("cmpl-") and a.model == live.name
    assert a.choices[0].finish_reason == "length" and a.choices[0].index == 0
    assert a.usage.completion_tokens == 8
    assert a.usage.prompt_tokens == len(tok.encode(STORY))
    assert a.usage.total_tokens == a.usage.prompt_tokens + 8
    texts = [a.choices[0].text, b.choices[0].text]
    assert texts[0] and texts[1] and texts[0] != texts[1]

    ids = [tok.encode(STORY), tok.encode(second)]
    for prompt in ([STORY, second], ids):
        r = c.completions.create(model=live.name, prompt=prompt, temperature=0, max_tokens=8)
        assert [ch.index for ch in r.choices] == [0, 1]
        assert [ch.text for ch in r.choices] == texts
        assert [ch.finish_reason for ch in r.choices] == ["length", "length"]
        assert r.usage.prompt_tokens == len(ids[0]) + len(ids[1])
        assert r.usage.completion_tokens == 16

    one = c.completions.create(model=live.name, prompt=ids[0], temperature=0, max_tokens=8)
    assert one.choices[0].text == texts[0]
    assert one.usage.prompt_tokens == len(ids[0])


def test_completions_streaming_matches_non_streaming(live):
    """Streamed completion text (per choice index) equals the non-streamed text; usage comes last."""
    prompts = [STORY, "The best way to learn"]
    full = live.client.completions.create(model=live.name, prompt=prompts, temperature=0, max_tokens=10)
    chunks = list(live.client.completions.create(model=live.name, prompt=prompts, temperature=0, max_tokens=10,
                                                 stream=True, stream_options={"include_usage": True}))
    *content_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage.model_dump() == full.usage.model_dump()
    texts, finishes = {0: "", 1: ""}, {0: [], 1: []}
    for ch in content_chunks:
        assert ch.object == "text_completion" and ch.id == chunks[0].id and len(ch.choices) == 1
        texts[ch.choices[0].index] += ch.choices[0].text
        if ch.choices[0].finish_reason:
            finishes[ch.choices[0].index].append(ch.choices[0].finish_reason)
    assert [texts[0], texts[1]] == [ch.text for ch in full.choices]
    assert finishes == {0: ["length"], 1: ["length"]}

    events = sse(f"{live.url}/v1/completions", {"prompt": STORY, "temperature": 0, "max_tokens": 10,
                                                "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events) == full.choices[0].text


# ---- stop strings ----------------------------------------------------------------------------


def test_stop_strings_truncate_before_the_match(live):
    """A stop string ends the text right before its first occurrence (earliest of several), streamed or not."""
    c = live.client
    free = c.completions.create(model=live.name, prompt=STORY, temperature=0, max_tokens=24).choices[0].text
    words = free.split(" ")
    assert len(words) > 10, free
    early, late = " ".join(words[4:6]), " ".join(words[8:10])  # multi-token, spans a token boundary
    expected = free[:free.index(early)]
    assert expected and early not in expected and len(expected) < len(free)

    r = c.completions.create(model=live.name, prompt=STORY, temperature=0, max_tokens=24, stop=[late, early])
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 24

    events = sse(f"{live.url}/v1/completions", {"prompt": STORY, "temperature": 0, "max_tokens": 24,
                                                "stop": [late, early], "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events) == expected
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"]] == ["stop"]

    chat = c.chat.completions.create(model=live.name, messages=FRANCE, temperature=0, stop="Paris")
    assert chat.choices[0].message.content == "The capital of France is "
    assert chat.choices[0].finish_reason == "stop"
    streamed = list(c.chat.completions.create(model=live.name, messages=FRANCE, temperature=0, stop="Paris",
                                              stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == "The capital of France is "
    assert [ch.choices[0].finish_reason for ch in streamed if ch.choices[0].finish_reason] == ["stop"]


# ---- sampling --------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(live):
    """n=2 at temperature 1 gives two indexed choices; the same seed gives the same texts, another seed not."""
    def ask(seed: int) -> list[str]:
        r = live.client.chat.completions.create(
            model=live.name, messages=[{"role": "user", "content": "Write a short poem about the sea."}],
            temperature=1.0, n=2, seed=seed, max_tokens=16)
        assert [ch.index for ch in r.choices] == [0, 1]
        assert all(ch.message.role == "assistant" and ch.message.content for ch in r.choices)
        assert 2 <= r.usage.completion_tokens <= 32
        return [ch.message.content for ch in r.choices]

    first = ask(1234)
    assert ask(1234) == first
    assert ask(98765) != first


def test_ignore_eos_and_min_tokens(live):
    """`ignore_eos` runs to exactly max_tokens; `min_tokens` keeps the answer going past its natural end."""
    c = live.client
    r = c.chat.completions.create(model=live.name, messages=FRANCE, temperature=0, max_tokens=20,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 20
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content.startswith(PARIS)

    r = c.chat.completions.create(model=live.name, messages=FRANCE, temperature=0, max_tokens=24,
                                  extra_body={"min_tokens": 12})
    text, n = r.choices[0].message.content, r.usage.completion_tokens
    assert text.startswith(PARIS) and len(text) > len(PARIS)
    if r.choices[0].finish_reason == "stop":
        assert 13 <= n <= 24  # EOS is banned for the first 12 tokens, and counted when it comes
    else:
        assert r.choices[0].finish_reason == "length" and n == 24

    r = c.completions.create(model=live.name, prompt=STORY, temperature=0, max_tokens=5)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


# ---- errors ----------------------------------------------------------------------------------

CHAT_ERRORS = [
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": []}, "messages"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"stream_options": {"include_usage": True}}, None),
]


@pytest.mark.parametrize(("patch", "param"), CHAT_ERRORS, ids=[p for _, p in CHAT_ERRORS])
def test_chat_invalid_parameters_are_400(live, patch, param):
    """Every invalid parameter is a 400 in OpenAI's error shape naming the field, never a 500."""
    body = {"model": live.name, "messages": [{"role": "user", "content": "hi"}], **patch}
    err = assert_openai_error(httpx.post(f"{live.url}/v1/chat/completions", json=body), 400, param)
    assert err["type"] == "invalid_request_error"
    if param:
        assert param in err["message"]


@pytest.mark.parametrize(("patch", "param"), [({"temperature": -1}, "temperature"), ({"prompt": []}, "prompt"),
                                               ({"prompt": [[1, 2], []]}, "prompt"), ({"n": 17}, "n")])
def test_completions_invalid_parameters_are_400(live, patch, param):
    """The same for /v1/completions."""
    body = {"model": live.name, "prompt": "hi", **patch}
    assert_openai_error(httpx.post(f"{live.url}/v1/completions", json=body), 400, param)


UNSUPPORTED = [
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ("cmpl", {"best_of": 3}, "best_of"),
]


@pytest.mark.parametrize(("kind", "patch", "param"), UNSUPPORTED, ids=[f"{k}-{p}" for k, _, p in UNSUPPORTED])
def test_unsupported_features_are_rejected_not_ignored(live, kind, patch, param):
    """Asking for something the worker cannot do yet (logprobs, penalties, JSON mode, tools, echo) is a 400
    naming the field, instead of a plain answer that silently lacks it."""
    path, base = (("/v1/chat/completions", {"messages": FRANCE}) if kind == "chat"
                  else ("/v1/completions", {"prompt": STORY}))
    err = assert_openai_error(httpx.post(f"{live.url}{path}", json={**base, **patch, "max_tokens": 1}), 400, param)
    assert err["code"] == "unsupported_parameter" and param in err["message"]


def test_neutral_values_of_unsupported_features_are_accepted(live):
    """Clients that send the defaults explicitly (penalty 0, logprobs false, empty logit_bias...) are served."""
    neutral = {"logprobs": False, "top_logprobs": 0, "presence_penalty": 0, "frequency_penalty": 0.0,
               "logit_bias": {}, "response_format": {"type": "text"}, "tools": [], "temperature": 0}
    r = live.client.chat.completions.create(model=live.name, messages=FRANCE, **neutral)
    assert r.choices[0].message.content == PARIS
    r = live.client.completions.create(model=live.name, prompt=STORY, echo=False, best_of=1, max_tokens=1,
                                       presence_penalty=0)
    assert r.usage.completion_tokens == 1


def test_context_window_overflow_is_400_with_the_numbers(live):
    """Asking for more than the context window says how many tokens were asked for and how many fit."""
    tok, limit = live.tokenizer, live.engine.max_model_len
    messages = [{"role": "user", "content": "hi"}]
    prompt_len = len(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True),
                                add_special_tokens=False))
    want = limit - prompt_len + 1
    r = httpx.post(f"{live.url}/v1/chat/completions", json={"messages": messages, "max_tokens": want})
    err = assert_openai_error(r, 400, "max_tokens")
    assert err["code"] == "context_length_exceeded"
    for number in (limit, prompt_len, want, prompt_len + want):
        assert str(number) in err["message"]

    # a prompt that alone fills the window
    huge = [{"role": "user", "content": "hello " * (limit + 100)}]
    huge_len = len(tok.encode(tok.apply_chat_template(huge, add_generation_prompt=True), add_special_tokens=False))
    err = assert_openai_error(httpx.post(f"{live.url}/v1/chat/completions", json={"messages": huge}), 400,
                              "messages")
    assert str(limit) in err["message"] and str(huge_len) in err["message"]

    ids = tok.encode(STORY)
    r = httpx.post(f"{live.url}/v1/completions", json={"prompt": ids, "max_tokens": limit})
    err = assert_openai_error(r, 400, "max_tokens")
    assert str(limit) in err["message"] and str(len(ids) + limit) in err["message"]
    r = httpx.post(f"{live.url}/v1/completions", json={"prompt": [1] * (limit + 5)})
    err = assert_openai_error(r, 400, "prompt")
    assert str(limit) in err["message"] and str(limit + 5) in err["message"]
    r = httpx.post(f"{live.url}/v1/completions", json={"prompt": [10**9]})
    assert_openai_error(r, 400, "prompt")

    with pytest.raises(openai.BadRequestError) as exc:
        live.client.chat.completions.create(model=live.name, messages=messages, max_tokens=want)
    assert exc.value.status_code == 400 and exc.value.param == "max_tokens"


def test_malformed_json_and_unknown_model(live):
    """A body that is not JSON is a 400; an unknown model is a 404 naming `model`."""
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = httpx.post(f"{live.url}{path}", content=b'{"messages": [', headers={"content-type": "application/json"})
        err = assert_openai_error(r, 400, None)
        assert "JSON" in err["message"]
    r = httpx.post(f"{live.url}/v1/chat/completions", json={"model": "no-such-model", "messages": FRANCE})
    err = assert_openai_error(r, 404, "model")
    assert "no-such-model" in err["message"] and live.name in err["message"]
    assert err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        live.client.completions.create(model="no-such-model", prompt="hi")


# ---- health ----------------------------------------------------------------------------------


def test_health_endpoints(live):
    """Liveness, readiness and the descriptive /health (with the seed's keys) on a ready worker."""
    assert httpx.get(f"{live.url}/healthz").status_code == 200
    r = httpx.get(f"{live.url}/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    h = httpx.get(f"{live.url}/health").json()
    assert {"status", "engine_status", "model", "model_path", "backend", "device", "max_model_len", "uptime_s",
            "timestamp", "hathora_region"} <= set(h)
    assert h["status"] == "ok" and h["engine_status"] == "ready"
    assert h["model"] == live.name and h["model_path"].endswith(".gguf")
    assert h["backend"] == "native" and h["device"] == "cpu"
    assert h["max_model_len"] == live.engine.max_model_len
    assert h["uptime_s"] >= 0 and abs(h["timestamp"] - time.time()) < 60
    assert h["hathora_region"] is None


def test_not_ready_worker_answers_503(default_gguf):
    """Before the model has loaded, /readyz and the inference routes say 503 (with Retry-After), not 500."""
    state = new_state(ServeConfig(), resolve_model("default", download=False))
    client = TestClient(create_app(state, load=False), raise_server_exceptions=False)
    assert client.get("/healthz").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json() == {"status": "loading"}
    assert client.get("/health").json()["engine_status"] == "loading"
    for path, body in (("/v1/chat/completions", {"messages": FRANCE}), ("/v1/completions", {"prompt": "hi"})):
        r = client.post(path, json=body)
        assert_openai_error(r, 503, None)
        assert r.headers["retry-after"]
    assert client.get("/v1/models").status_code == 200

    state.load_error = "RuntimeError: boom"
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json() == {"status": "failed", "error": "RuntimeError: boom"}


# ---- disconnects, concurrency, overload ------------------------------------------------------

LONG = {"messages": [{"role": "user", "content": "Tell me a long story."}], "temperature": 0,
        "max_tokens": 500, "ignore_eos": True}


def server_errors(caplog) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


def test_streaming_client_disconnect_aborts_and_frees_blocks(live, caplog):
    """A client that closes a stream mid-way stops the generation and frees its KV blocks at once."""
    wait_idle(live.engine)
    before = live.engine.stats().generation_tokens
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{live.url}/v1/chat/completions",
                                                 json={**LONG, "stream": True}) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 4:
                break
        assert live.engine.stats().running == 1
    wait_idle(live.engine, timeout=10)
    assert live.engine.stats().generation_tokens - before < 500
    assert server_errors(caplog) == []


def test_non_streaming_client_disconnect_aborts_and_frees_blocks(live, caplog):
    """A client that gives up on a non-streaming request (timeout) stops its generation too, and the server
    treats it as routine (no "Exception in ASGI application" in its log)."""
    wait_idle(live.engine)
    before = live.engine.stats().generation_tokens
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{live.url}/v1/completions", json={"prompt": STORY, "temperature": 0, "max_tokens": 500,
                                                       "ignore_eos": True}, timeout=1.5)
    wait_idle(live.engine, timeout=10)
    assert live.engine.stats().generation_tokens - before < 500
    time.sleep(0.3)  # the handler finishes just after the abort
    assert server_errors(caplog) == []


QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?", "Say hello.",
             "What is the largest planet?", "Who wrote Hamlet?", "What is water made of?", "Name a fruit.",
             "What do bees make?", "How many legs does a spider have?", "What is the opposite of hot?",
             "Name a musical instrument.", "What color is the sky?", "What is ice?", "Name an ocean.",
             "What is a triangle?"]


def test_concurrent_requests_match_solo_results(live):
    """16 users at once get exactly the greedy answers each would get alone (continuous batching is exact)."""
    def ask(c: httpx.Client, q: str) -> tuple[str, int]:
        r = c.post(f"{live.url}/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 10})
        assert r.status_code == 200, r.text
        body = r.json()
        return body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]

    with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=32)) as c:
        solo = [ask(c, q) for q in QUESTIONS]
        steps_before = live.engine.stats().steps
        with ThreadPoolExecutor(len(QUESTIONS)) as pool:
            together = list(pool.map(lambda q: ask(c, q), QUESTIONS))
    assert together == solo
    assert len(set(solo)) > 8
    # batched: far fewer engine steps than the tokens generated
    assert live.engine.stats().steps - steps_before < sum(n for _, n in solo)
    wait_idle(live.engine)


def test_full_queue_is_429_with_retry_after(live):
    """When the waiting queue is full, requests get 429 + Retry-After in OpenAI's shape (not queued, not 500)."""
    wait_idle(live.engine)
    saved = live.engine.cfg.max_queue_len
    live.engine.cfg.max_queue_len = 0
    try:
        for body in ({"messages": FRANCE}, {"messages": FRANCE, "stream": True}):
            r = httpx.post(f"{live.url}/v1/chat/completions", json=body)
            err = assert_openai_error(r, 429, None)
            assert err["type"] == "rate_limit_error"
            assert int(r.headers["retry-after"]) >= 1
        r = httpx.post(f"{live.url}/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 4})
        assert_openai_error(r, 429, None)
        with pytest.raises(openai.RateLimitError):
            live.client.chat.completions.create(model=live.name, messages=FRANCE)
    finally:
        live.engine.cfg.max_queue_len = saved
    wait_idle(live.engine)
    r = live.client.chat.completions.create(model=live.name, messages=FRANCE, temperature=0)
    assert r.choices[0].message.content == PARIS


# ---- the real command ------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_serve_end_to_end(default_gguf, tmp_path):
    """`python -m fleetserve serve` starts, becomes ready, answers the OpenAI client and exits on SIGTERM."""
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLEETSERVE_", "HATHORA_")) and k not in {"PORT", "HOST", "MODEL_PATH",
                                                                          "MAX_TOTAL_TOKENS", "LOG_LEVEL",
                                                                          "DEPLOYMENT_CONFIG_JSON"}}
    if "FLEETSERVE_HOME" in os.environ:
        env["FLEETSERVE_HOME"] = os.environ["FLEETSERVE_HOME"]
    env["HF_HUB_OFFLINE"] = "1"
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "fleetserve", "serve", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"serve exited early:\n{(tmp_path / 'serve.log').read_text()}"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "not ready within 120 s"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct", messages=FRANCE,
                                           temperature=0)
        assert r.choices[0].message.content == PARIS
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the captured SIGTERM, so -SIGTERM is a clean exit too
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        log.flush()
        assert "Traceback" not in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
