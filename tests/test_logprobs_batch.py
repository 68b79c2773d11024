"""Sampling controls and logprobs on the OpenAI routes, and the batch / tokenizer API, end to end on the
real embedded model (the app under uvicorn, the official `openai` client where it matters).

Loglikelihoods are checked against Hugging Face transformers on the same weights (one fp32 forward over
the whole token sequence); lm-evaluation-harness's `local-completions` request and parsing are replayed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import httpx
import openai
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fleetserve.config import ServeConfig
from fleetserve.models import resolve_model
from fleetserve.server.app import create_app, new_state
from fleetserve.server.routes_batch import BatchLimits, encode_pair
from tests.net import serve_in_thread

LL_TOL = 1e-3  # nats
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = "Once upon a time"
ONES = "1, 1, 1, 1, 1, 1, 1, 1,"

# (context, continuation) pairs: trailing space moved onto the continuation, empty context, unicode, code
PAIRS = [
    ("The capital of France is", " Paris"),
    ("The capital of France is ", "Paris"),
    ("Once upon a time", ", there was a little girl"),
    ("", "Hello world"),
    ("2 + 2 =", " 4"),
    ("Le café est", " très bon ☕"),
    ("def add(a, b):\n    return", " a + b"),
    ("The capital of France is", " a banana"),
]



@dataclass
class Live:
    url: str
    name: str
    app: FastAPI
    engine: object  # the raw NativeEngine
    tokenizer: object

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=120)

    def post(self, path: str, body: dict) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=120)


@pytest.fixture(scope="module")
def live(default_engine, tokenizer):
    state = new_state(ServeConfig(), resolve_model("default", download=False))
    state.engine, state.tokenizer = default_engine, tokenizer
    app = create_app(state, load=False)
    with serve_in_thread(app) as url:
        yield Live(url, state.served_model_name, app, default_engine, tokenizer)


@pytest.fixture(scope="module")
def hf(default_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name,
                                                dtype=torch.float32).eval()


def hf_token_logprobs(hf, ids: list[int]) -> tuple[list[float], list[bool]]:
    """Reference: for positions 1.., log p(ids[i] | ids[:i]) and whether ids[i] is the argmax."""
    with torch.inference_mode():
        logp = hf(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)[:-1]
    target = torch.tensor(ids[1:])
    return logp.gather(1, target[:, None]).squeeze(1).tolist(), (logp.argmax(dim=-1) == target).tolist()


def harness_split(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's rule (HFLM.loglikelihood + _encode_pair), written out independently."""
    if context == "":
        return [tok.bos_token_id], tok.encode(continuation, add_special_tokens=False)
    n = len(context) - len(context.rstrip())
    if n > 0:
        continuation = context[-n:] + continuation
        context = context[:-n]
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


def harness_parse_logprobs(body: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """What lm-eval's LocalCompletionsAPI.parse_logprobs does with a /v1/completions response."""
    res = []
    for choice, ctxlen in zip(sorted(body["choices"], key=lambda c: c["index"]), ctxlens):
        assert ctxlen > 0
        token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        is_greedy = all(tok == max(top.values()) for tok, top in zip(token_logprobs, top_logprobs))
        res.append((sum(token_logprobs), is_greedy))
    return res


def reference_ll(hf, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    lps, greedy = hf_token_logprobs(hf, ctx + cont)
    return sum(lps[len(ctx) - 1:]), all(greedy[len(ctx) - 1:])


# ---- loglikelihood vs transformers -------------------------------------------------------------


def test_loglikelihood_agrees_with_transformers(live, hf, tokenizer):
    """/loglikelihood sums the continuation's logprobs exactly as a full HF forward does, split as the harness does."""
    for ctx, cont in PAIRS:
        assert encode_pair(tokenizer, ctx, cont) == harness_split(tokenizer, ctx, cont), (ctx, cont)
    r = live.post("/loglikelihood", {"prompts": [c for c, _ in PAIRS], "continuations": [x for _, x in PAIRS]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"ll", "is_greedy"} and len(body["ll"]) == len(body["is_greedy"]) == len(PAIRS)
    refs = [reference_ll(hf, *harness_split(tokenizer, c, x)) for c, x in PAIRS]
    for (ctx, cont), ll, greedy, (ref_ll, ref_greedy) in zip(PAIRS, body["ll"], body["is_greedy"], refs):
        assert abs(ll - ref_ll) < LL_TOL, (ctx, cont, ll, ref_ll)
        assert greedy == ref_greedy, (ctx, cont)
    assert {g for _, g in refs} == {True, False}  # both outcomes are exercised
    # an empty continuation scores 0 and is (vacuously) greedy
    r = live.post("/loglikelihood", {"prompts": ["Hello"], "continuations": [""]})
    assert r.json() == {"ll": [0.0], "is_greedy": [True]}


def test_lm_eval_harness_local_completions_request(live, hf, tokenizer):
    """The exact payload lm-eval's `local-completions` sends for loglikelihood, parsed the way it parses it."""
    pairs = PAIRS[:5]
    splits = [harness_split(tokenizer, c, x) for c, x in pairs]
    inputs, ctxlens = [ctx + cont for ctx, cont in splits], [len(ctx) for ctx, _ in splits]
    payload = {"model": live.name, "prompt": inputs, "temperature": 0, "max_tokens": 1, "logprobs": 1,
               "seed": 1234, "echo": True}
    r = live.post("/v1/completions", payload)
    assert r.status_code == 200, r.text
    body = r.json()
    for choice, ids in zip(body["choices"], inputs):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(1 <= len(top) <= 2 for top in lp["top_logprobs"][1:])  # top 1 plus the chosen token
        assert choice["text"].startswith(tokenizer.decode(ids))
    parsed = harness_parse_logprobs(body, ctxlens)
    for (ll, greedy), (ctx, cont) in zip(parsed, splits):
        ref_ll, ref_greedy = reference_ll(hf, ctx, cont)
        assert abs(ll - ref_ll) < LL_TOL and greedy == ref_greedy
    batch = live.post("/loglikelihood", {"prompts": [c for c, _ in pairs], "continuations": [x for _, x in pairs]})
    assert [pytest.approx(v, abs=LL_TOL) for v in batch.json()["ll"]] == [ll for ll, _ in parsed]
    assert batch.json()["is_greedy"] == [g for _, g in parsed]

    # max_tokens 0 (echo only): exactly the prompt, every position scored, nothing generated
    ids = inputs[2]
    r = live.post("/v1/completions", {**payload, "prompt": ids, "max_tokens": 0, "logprobs": 3})
    assert r.status_code == 200, r.text
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    assert choice["finish_reason"] == "length" and choice["text"] == tokenizer.decode(ids)
    assert usage == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    ref, _ = hf_token_logprobs(hf, ids)
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert choice["logprobs"]["token_logprobs"][1:] == [pytest.approx(v, abs=LL_TOL) for v in ref]
    assert all(len(top) in (3, 4) for top in choice["logprobs"]["top_logprobs"][1:])

    # the harness's remote tokenizer probes /tokenizer_info and /tokenize
    info = httpx.get(f"{live.url}/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and info["chat_template"] == tokenizer.chat_template
    r = live.post("/tokenize", {"prompt": "test", "add_special_tokens": False})
    assert r.json()["tokens"] == tokenizer.encode("test", add_special_tokens=False)


def test_completions_echo_with_the_openai_client(live, hf, tokenizer):
    """Text prompt + echo + logprobs via the official client: prompt logprobs agree with HF, offsets index the text."""
    prompt = "The quick brown fox jumps over the"
    r = live.client.completions.create(model=live.name, prompt=prompt, echo=True, logprobs=2, max_tokens=3,
                                       temperature=0)
    choice = r.choices[0]
    lp = choice.logprobs
    ids = tokenizer.encode(prompt)
    assert choice.text.startswith(prompt) and len(lp.tokens) == len(ids) + 3 == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref, _ = hf_token_logprobs(hf, ids)
    assert lp.token_logprobs[1:len(ids)] == [pytest.approx(v, abs=LL_TOL) for v in ref]
    for tok, off in zip(lp.tokens, lp.text_offset):
        assert choice.text[off:off + len(tok)] == tok
    for tok, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert tok in top and top[tok] == value and len(top) <= 3
        assert max(top.values()) >= value
    # streaming gives the same text and the same logprobs, chunk by chunk
    chunks = list(live.client.completions.create(model=live.name, prompt=prompt, echo=True, logprobs=2,
                                                 max_tokens=3, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset
    assert [v for s in streamed for v in s.token_logprobs] == lp.token_logprobs
    # no logprobs asked: none given, echo still prepends the prompt
    r = live.client.completions.create(model=live.name, prompt=prompt, echo=True, max_tokens=2, temperature=0)
    assert r.choices[0].logprobs is None and r.choices[0].text.startswith(prompt)


# ---- chat logprobs -----------------------------------------------------------------------------


def _chat_entries(content) -> list[tuple]:
    """Comparable entries; logprobs to 1e-4 (a prefix-cache hit computes the prompt in other chunks)."""
    return [(e.token, e.bytes, pytest.approx(e.logprob, abs=1e-4),
             [(t.token, pytest.approx(t.logprob, abs=1e-4)) for t in e.top_logprobs]) for e in content]


def test_chat_logprobs_shape_and_streaming(live):
    """OpenAI's chat logprobs shape, one entry per completion token, streamed chunks adding up to the same."""
    c = live.client
    kw = {"model": live.name, "messages": FRANCE, "temperature": 0, "max_tokens": 16, "logprobs": True,
          "top_logprobs": 3}
    r = c.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens > 3
    text = r.choices[0].message.content
    assert "".join(e.token for e in content).startswith(text)
    for e in content:
        assert e.bytes == list(e.token.encode("utf-8"))
        assert len(e.top_logprobs) == 3
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True) and all(v <= 0 for v in tops)
        assert e.logprob <= tops[0]
        assert e.token == e.top_logprobs[0].token and e.logprob == tops[0]  # greedy: the chosen one is the top
    raw = httpx.post(f"{live.url}/v1/chat/completions", json={**kw, "max_tokens": 2}).json()
    assert set(raw["choices"][0]["logprobs"]) <= {"content", "refusal"}
    assert set(raw["choices"][0]["logprobs"]["content"][0]) == {"token", "logprob", "bytes", "top_logprobs"}
    assert set(raw["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0]) == {"token", "logprob", "bytes"}

    streamed = []
    for chunk in c.chat.completions.create(**kw, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            entries = chunk.choices[0].logprobs.content
            delta = chunk.choices[0].delta.content or ""
            if delta:  # a chunk's logprobs are its own tokens
                assert "".join(e.token for e in entries).startswith(delta[:1])
            streamed += entries
    assert _chat_entries(streamed) == _chat_entries(content)

    # a stop string holds text back while streaming; the logprobs travel with the tokens all the same
    stop_kw = {**kw, "stop": ["Paris"]}
    r = c.chat.completions.create(**stop_kw)
    assert r.choices[0].message.content == "The capital of France is "
    whole = r.choices[0].logprobs.content
    assert len(whole) == r.usage.completion_tokens
    streamed = [e for ch in c.chat.completions.create(**stop_kw, stream=True)
                if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert _chat_entries(streamed) == _chat_entries(whole)

    # logprobs without top_logprobs; n > 1 (each choice its own); off by default
    r = c.chat.completions.create(**{**kw, "top_logprobs": None, "n": 2, "max_tokens": 4})
    for ch in r.choices:
        assert len(ch.logprobs.content) == 4 and all(e.top_logprobs == [] for e in ch.logprobs.content)
    r = c.chat.completions.create(model=live.name, messages=FRANCE, temperature=0, max_tokens=2)
    assert r.choices[0].logprobs is None


def test_logit_bias_forces_a_token_and_bytes_are_exact(live, tokenizer):
    """+100 on one id makes greedy output that token; `bytes` are the token's real bytes, even half a character."""
    banana = tokenizer.encode(" banana")[0]
    r = live.client.completions.create(model=live.name, prompt=STORY, max_tokens=4, temperature=0,
                                       logit_bias={str(banana): 100})
    assert r.choices[0].text == " banana" * 4
    r = live.client.chat.completions.create(model=live.name, messages=FRANCE, max_tokens=3, temperature=0,
                                            logit_bias={str(banana): 100}, logprobs=True)
    assert r.choices[0].message.content == " banana" * 3
    # a byte-level piece holding the first byte of a 3-byte character: " \xe6" (as in " 日")
    half = next(i for i in tokenizer.encode(" 日本") if tokenizer.decode([i]).endswith("\ufffd"))
    r = live.client.chat.completions.create(model=live.name, messages=FRANCE, max_tokens=1, temperature=0,
                                            logit_bias={str(half): 100}, logprobs=True)
    entry = r.choices[0].logprobs.content[0]
    assert entry.token == tokenizer.decode([half], skip_special_tokens=False)
    assert bytes(entry.bytes) == " 日".encode()[:2]
    # -100 on the greedy first token moves greedy elsewhere
    base = live.client.completions.create(model=live.name, prompt=STORY, max_tokens=1, temperature=0, logprobs=0)
    first = tokenizer.encode(base.choices[0].text, add_special_tokens=False)[0]
    r = live.client.completions.create(model=live.name, prompt=STORY, max_tokens=1, temperature=0,
                                       logit_bias={str(first): -100})
    assert r.choices[0].text != base.choices[0].text


def test_penalties_change_a_repetitive_greedy_output(live):
    def complete(prompt: str, max_tokens: int = 8, **kw) -> str:
        r = live.client.completions.create(model=live.name, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           **kw)
        return r.choices[0].text

    base = complete(ONES)
    assert base == " 1, 1, 1"  # greedy repeats itself
    assert complete(ONES, frequency_penalty=2.0).startswith(" 1, 1, 2")  # counts grow until "1" loses
    assert complete(ONES, extra_body={"repetition_penalty": 2.0}) != base  # prompt tokens count too
    assert complete(ONES, presence_penalty=2.0) == base  # a flat 2 does not beat this model's certainty...
    story = complete(STORY, 12)
    assert complete(STORY, 12, presence_penalty=2.0) != story  # ...but changes a story (the second ", ")
    assert complete(ONES, frequency_penalty=0, presence_penalty=0, extra_body={"repetition_penalty": 1}) == base
    # logprobs are the model's raw distribution: a bias changes the pick, not the reported numbers
    r = live.client.completions.create(model=live.name, prompt=ONES, max_tokens=1, temperature=0, logprobs=1)
    lp = r.choices[0].logprobs
    assert lp.tokens == [" "]  # "1," is followed by " "
    r = live.client.completions.create(model=live.name, prompt=ONES, max_tokens=1, temperature=0, logprobs=1,
                                       logit_bias={"216": -100})  # 216: " "
    biased = r.choices[0].logprobs
    assert biased.tokens != [" "] and biased.top_logprobs[0][" "] == lp.token_logprobs[0]
    assert biased.token_logprobs[0] < lp.token_logprobs[0]


INVALID = [
    ("chat", {"frequency_penalty": 2.5}, "frequency_penalty"),
    ("chat", {"presence_penalty": -3}, "presence_penalty"),
    ("chat", {"repetition_penalty": 0}, "repetition_penalty"),
    ("chat", {"logit_bias": {"504": 101}}, "logit_bias"),
    ("chat", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("chat", {"logit_bias": {"504": "x"}}, "logit_bias"),
    ("chat", {"logit_bias": {"49152": 5}}, "logit_bias"),
    ("chat", {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("cmpl", {"logprobs": 6}, "logprobs"),
    ("cmpl", {"logprobs": -1}, "logprobs"),
    ("cmpl", {"max_tokens": 0}, "max_tokens"),
    ("cmpl", {"max_tokens": -1, "echo": True}, "max_tokens"),
    ("cmpl", {"frequency_penalty": -2.01}, "frequency_penalty"),
    ("cmpl", {"logit_bias": {"99999": 1}}, "logit_bias"),
]


@pytest.mark.parametrize(("kind", "patch", "param"), INVALID, ids=[f"{k}-{p}-{i}" for i, (k, _, p) in enumerate(INVALID)])
def test_invalid_sampling_parameters_are_400(live, kind, patch, param):
    path, base = (("/v1/chat/completions", {"messages": FRANCE}) if kind == "chat"
                  else ("/v1/completions", {"prompt": STORY}))
    r = live.post(path, {**base, "max_tokens": 1, **patch})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"] and err["type"] == "invalid_request_error"


# ---- /generate ----------------------------------------------------------------------------------

QUESTIONS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "Water boils at"]


def test_generate_defaults_order_and_usage(live, tokenizer, monkeypatch):
    seen = []
    original = live.engine.generate

    async def spy(req):
        seen.append(dataclasses.replace(req.sampling))
        req.sampling.max_tokens = min(req.sampling.max_tokens, 4)  # keep the default-size run short
        return await original(req)

    monkeypatch.setattr(live.engine, "generate", spy)
    r = live.post("/generate", {"prompts": [STORY, "Hello"]})
    assert r.status_code == 200, r.text
    assert [(s.temperature, s.top_p, s.max_tokens, s.seed) for s in seen] == [(0.7, 1.0, 128, None)] * 2
    assert len(r.json()["completions"]) == 2
    monkeypatch.undo()

    r = live.post("/generate", {"prompts": QUESTIONS, "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    solo = [live.client.completions.create(model=live.name, prompt=q, max_tokens=5, temperature=0)
            for q in QUESTIONS]
    assert body["completions"] == [s.choices[0].text for s in solo]  # order preserved, batching exact
    usage = body["usage"]
    assert usage["prompt_tokens"] == sum(len(tokenizer.encode(q)) for q in QUESTIONS)
    assert usage["completion_tokens"] == sum(s.usage.completion_tokens for s in solo)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    # seeded sampling: the same prompt and seed give the same completion, wherever it sits in the batch
    r1 = live.post("/generate", {"prompts": [STORY, "Hello", STORY], "max_tokens": 8, "temperature": 1.0,
                                 "seed": 7}).json()["completions"]
    r2 = live.post("/generate", {"prompts": [STORY], "max_tokens": 8, "temperature": 1.0, "seed": 7})
    assert r1[0] == r1[2] == r2.json()["completions"][0]
    # stop strings cut the text before the match
    stop = live.post("/generate", {"prompts": QUESTIONS, "max_tokens": 5, "temperature": 0, "stop": ["e"]})
    for full, cut in zip(body["completions"], stop.json()["completions"]):
        assert "e" not in cut and full.startswith(cut) and (cut == full or full[len(cut)] == "e")


def test_generate_caps_and_errors(live):
    ok = {"prompts": ["Hi"], "max_tokens": 1}
    schema = [
        {"prompts": []}, {"prompts": [""]}, {"prompts": "Hi"}, {"prompts": ["Hi"] * 65},
        {**ok, "max_tokens": 0}, {**ok, "max_tokens": 1025}, {**ok, "temperature": 2.5}, {**ok, "temperature": -1},
        {**ok, "top_p": 0}, {**ok, "top_p": 1.5}, {**ok, "stop": ["a", "b", "c", "d", "e"]}, {**ok, "stop": [""]},
        {**ok, "seed": -1}, {**ok, "max_new_tokens": 5},
    ]
    for body in schema:
        r = live.post("/generate", body)
        assert r.status_code == 422, (body, r.text)
        assert isinstance(r.json()["detail"], list) and r.json()["detail"][0]["loc"][0] == "body"
    r = live.post("/generate", {"prompts": ["Hi"] * 65})
    assert r.json()["detail"][0]["loc"] == ["body", "prompts"] and "64" in r.json()["detail"][0]["msg"]
    r = live.post("/generate", {**ok, "max_tokens": 1025})
    assert r.json()["detail"][0]["loc"] == ["body", "max_tokens"] and "1024" in r.json()["detail"][0]["msg"]

    live.app.state.batch_limits = BatchLimits(max_batch_size=2, max_new_tokens=8, max_request_tokens=20)
    try:
        assert live.post("/generate", {"prompts": ["a", "b", "c"], "max_tokens": 1}).status_code == 422
        assert live.post("/loglikelihood", {"prompts": ["a"] * 3, "continuations": ["b"] * 3}).status_code == 422
        assert live.post("/generate", {**ok, "max_tokens": 9}).status_code == 422
        assert live.post("/generate", {"prompts": ["a", "b"], "max_tokens": 8}).status_code == 200
        r = live.post("/generate", {"prompts": ["one two three four five six", "b"], "max_tokens": 8})
        assert r.status_code == 400 and "20" in r.json()["detail"]
    finally:
        del live.app.state.batch_limits

    # context overflow is a 400 with the numbers
    long = " hello" * (live.engine.max_model_len - 4)
    r = live.post("/generate", {"prompts": ["Hi", long], "max_tokens": 8})
    assert r.status_code == 400 and "prompts[1]" in r.json()["detail"] and str(live.engine.max_model_len) in r.text
    r = live.post("/loglikelihood", {"prompts": ["Hi", long], "continuations": [" there", " world" * 10]})
    assert r.status_code == 400 and "prompts[1]" in r.json()["detail"]
    for body in ({"prompts": ["a", "b"], "continuations": ["c"]}, {"prompts": [], "continuations": []},
                 {"prompts": ["a"]}, {"prompts": ["a"], "continuations": ["b"], "extra": 1}):
        assert live.post("/loglikelihood", body).status_code == 422, body

    # a full queue is 429 with Retry-After; the engine's state is untouched afterwards
    saved = live.engine.cfg.max_queue_len
    live.engine.cfg.max_queue_len = 0
    try:
        for path, body in (("/generate", ok), ("/loglikelihood", {"prompts": ["Hello"], "continuations": [" world"]})):
            r = live.post(path, body)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "detail" in r.json()
    finally:
        live.engine.cfg.max_queue_len = saved
    assert live.post("/generate", ok).status_code == 200


def test_not_ready_and_auth(default_engine, tokenizer):
    """503 + Retry-After while the model loads; with an API key configured the batch routes need it."""
    state = new_state(ServeConfig(), resolve_model("default", download=False))
    client = TestClient(create_app(state, load=False))
    for path, body in (("/generate", {"prompts": ["a"]}), ("/loglikelihood", {"prompts": ["a"], "continuations": ["b"]}),
                       ("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [1]})):
        r = client.post(path, json=body)
        assert r.status_code == 503 and r.headers["retry-after"] and "loading" in r.json()["detail"], path

    state = new_state(ServeConfig(api_keys=["sekret-key"]), resolve_model("default", download=False))
    state.engine, state.tokenizer = default_engine, tokenizer
    client = TestClient(create_app(state, load=False))
    for path in ("/generate", "/loglikelihood", "/tokenize", "/detokenize"):
        assert client.post(path, json={}).status_code == 401, path
    r = client.post("/tokenize", json={"prompt": "a"}, headers={"Authorization": "Bearer sekret-key"})
    assert r.status_code == 200


# ---- /tokenize, /detokenize, /v1/models --------------------------------------------------------


def test_tokenize_detokenize_round_trip(live, tokenizer):
    limit = live.engine.max_model_len
    for text in ("Hello world", "Le café ☕ coûte 2€ — 日本語 ok", "  spaces\n\ttabs  "):
        r = live.post("/tokenize", {"prompt": text})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body == {"tokens": tokenizer.encode(text), "count": len(tokenizer.encode(text)), "max_model_len": limit}
        assert live.post("/detokenize", {"tokens": body["tokens"]}).json() == {"prompt": text}
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = live.post("/tokenize", {"messages": msgs})
    rendered = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    assert r.json()["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)
    no_gen = live.post("/tokenize", {"messages": msgs, "add_generation_prompt": False}).json()
    assert no_gen["count"] < r.json()["count"]
    strs = live.post("/tokenize", {"prompt": "Hello world", "return_token_strs": True}).json()
    assert strs["token_strs"] == [tokenizer.id_to_token(i) for i in strs["tokens"]]

    assert live.post("/detokenize", {"tokens": [tokenizer.vocab_size]}).status_code == 400
    assert live.post("/detokenize", {"tokens": []}).json() == {"prompt": ""}
    for path, body in (("/detokenize", {"tokens": [-1]}), ("/detokenize", {"tokens": ["x"]}),
                       ("/tokenize", {}), ("/tokenize", {"prompt": "a", "messages": msgs}),
                       ("/tokenize", {"messages": [{"role": "wizard", "content": "hi"}]})):
        assert live.post(path, body).status_code == 422, (path, body)

    models = live.client.models.list()
    assert models.data[0].model_extra["max_model_len"] == limit
    info = httpx.get(f"{live.url}/tokenizer_info").json()
    assert info["max_model_len"] == limit and info["vocab_size"] == tokenizer.vocab_size
