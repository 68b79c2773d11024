"""Property-based fuzzing of both HTTP surfaces: the worker's OpenAPI schema (a real uvicorn server on a
tiny random Llama, so generation is cheap) and the control plane's (a platform whose provider starts
nothing), with schemathesis; plus hand-written hypothesis strategies for what schema-driven generation
does not reach: bytes that are not UTF-8, lone surrogates, huge numbers, deep nesting, wrong content
types, extreme sampling parameters, oversized bodies, and path parameters that try to leave
FLEETSERVE_HOME.

What must hold for every input: no 5xx (a 503 only as deliberate backpressure, with Retry-After), an
answer within a per-request timeout (no hang), OpenAI's error shape on /v1, and no file outside the
state directory opened on behalf of a request.

Budget: FLEETSERVE_FUZZ_EXAMPLES examples per operation / property (default 30, derandomized, so a run is
repeatable); FLEETSERVE_FUZZ_RANDOM=1 explores new inputs on every run.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetserve.config import ServeConfig
from fleetserve.control.platform import Platform, create_platform_app
from fleetserve.control.providers.base import Liveness
from fleetserve.control.providers.local import tail_lines
from fleetserve.control.store import ReplicaRow
from fleetserve.engine.native.engine import EngineConfig, NativeEngine
from fleetserve.gateway.router import Gateway
from fleetserve.models import ModelFiles, resolve_model
from fleetserve.server.app import create_app, new_state
from fleetserve.tokenizer import Tokenizer
from tests.net import serve_in_thread
from tests.reference import write_tiny_checkpoint

REQUEST_TIMEOUT_S = 30.0  # an answer slower than this counts as a hang
MAX_BODY = 64 << 10  # the fuzzed worker's --max-body-bytes (small, so 413 is cheap to reach)
EXAMPLES = int(os.environ.get("FLEETSERVE_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("FLEETSERVE_FUZZ_RANDOM"),
                database=None, suppress_health_check=list(HealthCheck))
CANARY = "fleetserve-canary-7d1f0c"  # content of files outside FLEETSERVE_HOME that no response may reveal
GENERATION_CAP = 8  # tokens per fuzzed generation: the budget goes into input variety, not long outputs


# ---- servers ------------------------------------------------------------------------------------------




@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """(checkpoint dir, tokenizer, engine) of a tiny random Llama: every request is cheap to serve."""
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-fuzz"), "llama", tokenizer,
                                 max_position_embeddings=256)
    tok = Tokenizer.from_hf_dir(path)
    engine = NativeEngine.load("hf", path, tok.eos_token_ids,
                               EngineConfig(max_model_len=256, kv_cache_tokens=16384, max_queue_len=512),
                               torch.device("cpu"), torch.float32)
    engine.start()
    yield path, tok, engine
    engine.stop()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A root with FLEETSERVE_HOME dirs inside and canary files beside them (outside every home)."""
    root = tmp_path_factory.mktemp("sandbox")
    for name in ("canary", "canary.log", "canary.jsonl", "passwd"):
        (root / name).write_text(f"{CANARY}\n")
    return root


@pytest.fixture(scope="module")
def worker(tiny, sandbox):
    """(base URL, app, state) of the real worker app on the tiny engine, its log file under its home."""
    path, tok, engine = tiny
    home = sandbox / "worker-home"
    state = new_state(ServeConfig(model=str(path), max_body_bytes=MAX_BODY, max_new_tokens=GENERATION_CAP),
                      resolve_model(str(path), download=False))
    state.engine, state.tokenizer = engine, tok
    state.log_file = home / "logs" / "worker.log"
    state.log_file.parent.mkdir(parents=True)
    state.log_file.write_text('{"msg": "a line"}\n')
    app = create_app(state, load=False)
    with serve_in_thread(app) as url:
        yield url, app, state


class NullProvider:
    """Starts nothing: replicas stay `starting` forever (so no worker process is ever spawned). A replica row
    a test puts in the store with status `ready` is served from its URL; logs come from its row's log path."""

    name = "null"

    def __init__(self):
        self.stopped: set[str] = set()

    async def start(self, spec, replica_id, generation):
        return ReplicaRow(replica_id, spec.name, generation, None, None, None, "starting", time.time(), None)

    async def observe(self, r):
        return Liveness(r.id not in self.stopped, 0, "stopped")

    async def ready(self, r, client):
        return r.url is not None

    async def stop(self, r, force=False):
        self.stopped.add(r.id)  # gone at once (the platform's shutdown waits for replicas to exit)

    async def release(self, r):
        return None

    async def logs(self, r, tail):
        return tail_lines(Path(r.log_path), tail) if r.log_path else []

    def log_file(self, r):
        return Path(r.log_path) if r.log_path else None


NULL_PROVIDERS = dict.fromkeys(("local", "hathora", "kubernetes"), NullProvider)


@pytest.fixture(scope="module")
def platform(sandbox):
    """(base URL, Platform) of the real platform app with null providers, under uvicorn."""
    home = sandbox / "platform-home"
    p = Platform(home, "http://127.0.0.1:1", default_deployment=False, reconcile_interval_s=0.2,
                 providers=NULL_PROVIDERS)
    p.gateway.hold_timeout_s = 0.3  # a deployment without a ready replica answers 503 quickly
    app = create_platform_app(p)
    with serve_in_thread(app) as url:
        yield url, p


def wait_idle(engine, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if s.running == 0 and s.waiting == 0 and engine.block_manager.num_used == 0:
            return
        assert time.monotonic() < deadline, f"engine not idle: {s}, blocks used {engine.block_manager.num_used}"
        time.sleep(0.05)


# ---- what every response must satisfy -------------------------------------------------------------------


def check_response(status: int, headers, text: str, path: str, request: str) -> None:
    """No 5xx (a 503 only as deliberate backpressure, with Retry-After); OpenAI's error shape on /v1; no file
    content from outside FLEETSERVE_HOME."""
    where = f"\nrequest: {request[:3000]}\nresponse: {status} {text[:800]}"
    assert status < 500 or (status == 503 and "retry-after" in {k.lower() for k in headers}), f"5xx{where}"
    if path.startswith("/v1/") and status >= 400:
        body = json.loads(text)
        assert set(body) == {"error"}, f"not OpenAI's error shape{where}"
        assert {"message", "type", "param", "code"} <= set(body["error"]), f"not OpenAI's error shape{where}"
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], where
    assert CANARY not in text and "root:x:0:0" not in text, f"file content leaked{where}"


def check_case(case, response) -> None:
    request = f"{case.method} {case.formatted_path} query={case.query} body={json.dumps(case.body, default=repr)}"
    check_response(response.status_code, response.headers, response.text, case.path, request)


def cap_generation(case) -> None:
    """Bound the work a valid generation asks for (an invalid max_tokens such as 10**9 is still sent as it is)."""
    body = case.body
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1 << 20:
            body[key] = min(value, GENERATION_CAP)
    if case.path in ("/v1/chat/completions", "/v1/completions") and "max_tokens" not in body \
            and "max_completion_tokens" not in body:
        body["max_tokens"] = GENERATION_CAP


def _schema(app) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_dict(app.openapi())
    schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE,
                                           schemathesis.GenerationMode.NEGATIVE])
    return schema


# The schemas are the apps' whatever they serve: built at import from apps with nothing loaded or started
# (schemathesis's fixture-based lazy loading does not work with this pytest version).
WORKER_SCHEMA = _schema(create_app(new_state(ServeConfig(), ModelFiles("tiny", "tiny", "hf", Path("."), "local")),
                                   load=False))
PLATFORM_SCHEMA = _schema(create_platform_app(SimpleNamespace(api_keys=[], gateway=Gateway(),
                                                              deployment_names=lambda: [])))


# ---- schema-driven fuzzing ---------------------------------------------------------------------------------


@WORKER_SCHEMA.parametrize()
@FUZZ
def test_worker_schema(case, worker):
    url, _, _ = worker
    cap_generation(case)
    check_case(case, case.call(base_url=url, timeout=REQUEST_TIMEOUT_S))


@PLATFORM_SCHEMA.parametrize()
@FUZZ
def test_platform_schema(case, platform):
    url, p = platform
    if isinstance(case.query, dict) and case.query.get("follow") not in (None, False, "false"):
        case.query["follow"] = "false"  # `logs?follow=true` streams until the client leaves: not a hang
    check_case(case, case.call(base_url=url, timeout=REQUEST_TIMEOUT_S))
    assert all(r.pid is None for d in p.store.list() for r in p.store.replicas(d.name))  # nothing spawned


def test_fuzzing_reached_success_paths(worker, platform):
    """The fuzzing above is not all rejections: the worker generated, the platform stored deployments."""
    _, _, state = worker
    assert state.raw_engine.stats().generation_tokens > 0
    wait_idle(state.raw_engine)  # and nothing it started is left holding KV blocks


# ---- hand-written strategies: what schema-driven generation does not send ---------------------------------


def json_text(value) -> str:
    """JSON text for a Python value, where `Raw` parts are written verbatim (NaN, 1e999, lone surrogates...)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{json_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(json_text(v) for v in value) + "]"
    return json.dumps(value)


class Raw:
    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:60]!r}{'...' if len(self.text) > 60 else ''})"


SURROGATES = st.sampled_from(["\\ud800", "\\udfff", "\\udc00\\ud800", "x\\ud83dy", "\\ud83d"]).map(
    lambda s: Raw(f'"{s}"'))
HUGE_NUMBERS = st.one_of(
    st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "-Infinity", "1e-400", "-0", "4.9e-324",
                     "1.7976931348623157e308", str(2**63), str(-2**63 - 1), str(2**64)]),
    st.integers(min_value=20, max_value=5000).map(lambda n: "9" * n),
).map(Raw)
DEEP = st.tuples(st.one_of(st.sampled_from([900, 999, 1001, 3000, 100_000]), st.integers(min_value=1, max_value=50)),
                 st.sampled_from(["[]", "{}"])).map(
    lambda t: Raw(('[' * t[0] + ']' * t[0]) if t[1] == "[]" else ('{"a":' * t[0] + "1" + "}" * t[0])))
ODD_STRINGS = st.one_of(
    st.text(max_size=64),  # any code point hypothesis likes, incl. NUL, RTL marks, non-characters
    st.sampled_from(["\u0000", "\ufeff", "\uffff", "\U0010ffff", "\u202e", "a" * 70000]),
)
WEIRD_VALUES = st.one_of(SURROGATES, HUGE_NUMBERS, DEEP, ODD_STRINGS, st.none(), st.booleans(),
                         st.lists(st.integers(min_value=-2**70, max_value=2**70), max_size=4),
                         st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
WORKER_BODIES = {
    "/v1/chat/completions": (CHAT, ["messages.0.content", "messages.0.role", "messages", "model", "stop",
                                    "temperature", "top_p", "top_k", "max_tokens", "seed", "n", "logit_bias",
                                    "stop_token_ids", "response_format", "tools", "tool_choice", "user",
                                    "repetition_penalty", "min_tokens", "logprobs", "top_logprobs"]),
    "/v1/completions": ({"prompt": "hi", "max_tokens": 4}, ["prompt", "prompt.0", "model", "stop", "temperature",
                                                            "max_tokens", "echo", "logprobs", "seed", "suffix"]),
    "/generate": ({"prompts": ["hi"], "max_tokens": 4}, ["prompts", "prompts.0", "max_tokens", "temperature",
                                                         "top_p", "seed"]),
    "/loglikelihood": ({"prompts": ["hi"], "continuations": [" there"]}, ["prompts.0", "continuations.0",
                                                                         "continuations"]),
    "/tokenize": ({"prompt": "hi"}, ["prompt", "messages", "add_special_tokens"]),
    "/detokenize": ({"tokens": [1, 2]}, ["tokens", "tokens.0"]),
}
CONTENT_TYPES = st.sampled_from([
    "application/json", None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
    "application/json; charset=utf-16", "application/xml", "application/vnd.api+json", "*/*", "",
    "application/json; charset=latin-1"])


def with_value(base: dict, dotted: str, value):
    """A deep copy of `base` with the value at `dotted` (list indexes as numbers) replaced or added."""
    body = json.loads(json.dumps(base))
    parts = dotted.split(".")
    target = body
    for part in parts[:-1]:
        key = int(part) if isinstance(target, list) else part
        if isinstance(target, dict) and not isinstance(target.get(key), (dict, list)):
            target[key] = {}
        target = target[key]
    last = parts[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return body


@st.composite
def worker_requests(draw):
    path = draw(st.sampled_from(sorted(WORKER_BODIES)))
    base, fields = WORKER_BODIES[path]
    kind = draw(st.sampled_from(["field", "field", "field", "bytes", "text"]))
    if kind == "bytes":
        body = draw(st.binary(max_size=300))  # mostly not UTF-8, never JSON
    elif kind == "text":
        body = draw(st.text(max_size=300)).encode("utf-8", "surrogatepass")
    else:
        body = json_text(with_value(base, draw(st.sampled_from(fields)), draw(WEIRD_VALUES))).encode(
            "utf-8", "surrogatepass")
    return path, body, draw(CONTENT_TYPES)


def _post(client: httpx.Client, url: str, path: str, body: bytes, content_type: str | None):
    headers = {} if content_type is None else {"content-type": content_type}
    r = client.post(f"{url}{path}", content=body, headers=headers)
    check_response(r.status_code, r.headers, r.text, path,
                   f"POST {path} content-type={content_type!r} body={body[:2000]!r}")
    return r


@given(req=worker_requests())
@FUZZ
def test_worker_survives_malformed_bodies(worker, req):
    url, _, _ = worker
    path, body, content_type = req
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as c:
        r = _post(c, url, path, body, content_type)
    if len(body) > MAX_BODY:
        assert r.status_code == 413


SAMPLING = st.fixed_dictionaries({}, optional={
    "temperature": st.one_of(st.floats(min_value=0, max_value=2), st.sampled_from([5e-324, 1e-45, 1e-300, 2.0])),
    "top_p": st.one_of(st.floats(min_value=0, max_value=1), st.just(5e-324)),
    "top_k": st.one_of(st.integers(min_value=-2, max_value=100), st.sampled_from([2**31, 2**63 - 1, 2**63, 2**80])),
    "min_p": st.floats(min_value=0, max_value=1),
    "repetition_penalty": st.one_of(st.floats(min_value=0, max_value=1e308, exclude_min=True),
                                    st.sampled_from([5e-324, 1e-300, 1e300])),
    "presence_penalty": st.floats(min_value=-2, max_value=2),
    "frequency_penalty": st.floats(min_value=-2, max_value=2),
    "seed": st.one_of(st.integers(min_value=0, max_value=2**63 - 1), st.sampled_from([-1, 2**63, 2**64])),
    "min_tokens": st.integers(min_value=0, max_value=10**9),
    "stop_token_ids": st.lists(st.integers(min_value=-5, max_value=2**70), max_size=3),
    "logit_bias": st.dictionaries(st.integers(min_value=0, max_value=60000).map(str),
                                  st.floats(min_value=-100, max_value=100), max_size=3),
    "stop": st.one_of(st.text(min_size=1, max_size=4), st.lists(st.text(min_size=1, max_size=3), max_size=4)),
    "ignore_eos": st.booleans(),
    "n": st.integers(min_value=1, max_value=4),
    "stream": st.booleans(),
    "logprobs": st.booleans(),
})


@given(params=SAMPLING, chat=st.booleans(), concurrent=st.booleans())
@FUZZ
def test_extreme_sampling_parameters_never_fail_a_step(worker, params, chat, concurrent):
    """Valid-by-schema sampling values at their extremes (a temperature of 5e-324, a repetition penalty of
    1e-300, top_k beyond int64, stop ids outside the vocabulary...) are served or refused with a 400, and
    never fail an engine step: a failed step fails every request batched with it, so an innocent request
    running alongside must still finish normally."""
    url, _, state = worker
    body = {**params, "max_tokens": 4}
    if chat:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": "hi"}]
        if "logprobs" in params:
            body["top_logprobs"] = 2 if params["logprobs"] else None
    else:
        path = "/v1/completions"
        body["prompt"] = "hi"
        body["logprobs"] = 2 if params.get("logprobs") else None
    innocent = {"prompt": "Once upon a time", "max_tokens": 6, "ignore_eos": True, "temperature": 0}
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as c:
        if concurrent:
            holder = {}
            t = threading.Thread(target=lambda: holder.update(r=c.post(f"{url}/v1/completions", json=innocent)))
            t.start()
        r = _post(c, url, path, json.dumps(body).encode(), "application/json")
        if r.status_code == 200 and body.get("stream"):
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]", r.text[-500:]
            assert not any('"error"' in e for e in events[:-1]), r.text[-1000:]
        if concurrent:
            t.join(REQUEST_TIMEOUT_S)
            assert holder["r"].status_code == 200, holder["r"].text
            assert holder["r"].json()["usage"]["completion_tokens"] == 6
    assert state.raw_engine.health().state.value == "ready"


@pytest.mark.parametrize("path", sorted(WORKER_BODIES))
def test_worker_oversized_bodies_are_413(worker, path):
    """Over --max-body-bytes: 413 from Content-Length, and from a chunked upload with no length."""
    url, _, _ = worker
    big = b'{"prompt": "' + b"a" * (MAX_BODY + 10) + b'"}'
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as c:
        r = _post(c, url, path, big, "application/json")
        assert r.status_code == 413, r.text
        chunked = c.post(f"{url}{path}", content=iter([big[i:i + 8192] for i in range(0, len(big), 8192)]),
                         headers={"content-type": "application/json"})
        assert chunked.status_code == 413, chunked.text
        if path.startswith("/v1/"):
            assert r.json()["error"]["code"] == "request_too_large"


# ---- the control plane: malformed bodies, oversized bodies ---------------------------------------------------

SPEC = {"name": "alpha", "model": "default", "replicas": {"min": 0, "max": 1}}
PLATFORM_BODIES = {
    "/api/v1/deployments": (SPEC, ["name", "model", "revision", "hf_token", "replicas.min", "replicas.max",
                                   "autoscale.target_concurrency", "autoscale.window_s", "cpu", "memory_mb",
                                   "engine_args.max_batch_tokens", "engine_args", "max_model_len", "gpu",
                                   "kubernetes", "provider", "region", "image", "precision"]),
    "/v1/chat/completions": ({"model": "ghost", **CHAT}, ["model", "messages", "messages.0.content"]),
    "/v1/completions": ({"model": "ghost", "prompt": "hi"}, ["model", "prompt"]),
    "/deployments/ghost/generate": ({"prompts": ["hi"]}, ["prompts", "prompts.0"]),
}


@st.composite
def platform_requests(draw):
    path = draw(st.sampled_from(sorted(PLATFORM_BODIES)))
    base, fields = PLATFORM_BODIES[path]
    kind = draw(st.sampled_from(["field", "field", "field", "bytes", "text"]))
    if kind == "bytes":
        body = draw(st.binary(max_size=300))
    elif kind == "text":
        body = draw(st.text(max_size=300)).encode("utf-8", "surrogatepass")
    else:
        value = with_value(base, draw(st.sampled_from(fields)), draw(WEIRD_VALUES))
        if path == "/api/v1/deployments":
            value["name"] = value["name"] if not isinstance(value.get("name"), str) or value["name"] != "alpha" \
                else f"f{draw(st.integers(min_value=0, max_value=10**9))}"
            if isinstance(value.get("replicas"), dict):
                value["replicas"]["min"] = 0  # whatever else is fuzzed, no replica is wanted
        body = json_text(value).encode("utf-8", "surrogatepass")
    return path, body, draw(CONTENT_TYPES)


@given(req=platform_requests())
@FUZZ
def test_platform_survives_malformed_bodies(platform, req):
    url, p = platform
    path, body, content_type = req
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as c:
        _post(c, url, path, body, content_type)
        # whatever was accepted can be read back: no request may poison the store
        listing = c.get(f"{url}/api/v1/deployments")
        assert listing.status_code == 200, listing.text
    for d in p.store.list():
        assert json.loads(d.spec.model_dump_json())  # stored specs stay valid JSON


def test_platform_oversized_bodies_are_413(platform):
    """The control plane buffers request bodies (the gateway reads them to route by `model`): it needs the same
    bound as a worker, or one client can make it hold gigabytes."""
    url, _ = platform
    big = b'{"name": "' + b"a" * (8 << 20) + b'"}'
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as c:
        for path in ("/api/v1/deployments", "/v1/chat/completions", "/deployments/ghost/generate"):
            r = _post(c, url, path, big, "application/json")
            assert r.status_code == 413, (path, r.status_code, r.text[:200])
            chunked = c.post(f"{url}{path}", content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                             headers={"content-type": "application/json"})
            assert chunked.status_code == 413, (path, chunked.status_code)


# ---- path parameters never leave FLEETSERVE_HOME ---------------------------------------------------------------

_OPENED: list[str] | None = None


def _audit(event: str, args) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # process-wide and permanent; records only while a test sets _OPENED


@contextmanager
def opened_files():
    """Every path this process opens meanwhile (every thread: the servers run in this process too)."""
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def raw_get(base: str, raw_path: str, timeout: float = 5.0) -> tuple[int, dict, str]:
    """GET with the path sent exactly as written (no client-side normalisation of `..` or %-escapes); a
    response that is still streaming after `timeout` (logs?follow=true) is cut there."""
    import http.client
    from urllib.parse import urlsplit

    host = urlsplit(base)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=timeout)
    try:
        conn.request("GET", raw_path)
        resp = conn.getresponse()
        try:
            body = resp.read()
        except (TimeoutError, http.client.IncompleteRead) as exc:
            body = getattr(exc, "partial", b"") or b""
        return resp.status, dict(resp.getheaders()), body.decode("utf-8", "replace")
    finally:
        conn.close()


TRAVERSALS = ["../../canary", "..%2F..%2Fcanary", "%2e%2e%2f%2e%2e%2fcanary", "%2e%2e/%2e%2e/canary",
              "....//....//canary", "..%252F..%252Fcanary", "..\\..\\canary", "/etc/passwd", "%2Fetc%2Fpasswd",
              "..%00/canary", "../../../../../../../../../../etc/passwd", "web/../../../canary"]


class ReplicaOfWorker(NullProvider):
    """Each replica *is* the in-process worker: ready at its URL, with a log file under the platform's home."""

    url: str = ""
    home: Path = Path(".")

    async def start(self, spec, replica_id, generation):
        log = self.home / "logs" / spec.name / f"{replica_id}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text('{"msg": "replica line"}\n')
        return ReplicaRow(replica_id, spec.name, generation, None, None, self.url, "starting", time.time(), str(log))


@pytest.fixture(scope="module")
def platform_with_replica(worker, sandbox):
    url_worker, _, _ = worker
    home = sandbox / "platform2-home"
    ReplicaOfWorker.url, ReplicaOfWorker.home = url_worker, home
    p = Platform(home, "http://127.0.0.1:1", default_deployment=False, reconcile_interval_s=0.1,
                 providers=dict.fromkeys(NULL_PROVIDERS, ReplicaOfWorker))
    app = create_platform_app(p)
    with serve_in_thread(app) as url:
        r = httpx.post(f"{url}/api/v1/deployments", json={"name": "web", "replicas": {"min": 1, "max": 1}})
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/api/v1/deployments/web").json()["ready_replicas"] != 1:
            assert time.monotonic() < deadline, "the in-process replica never became ready"
            time.sleep(0.05)
        yield url, p, home


def test_path_parameters_never_reach_files_outside_the_home(worker, platform_with_replica, sandbox):
    """Deployment names, replica ids and passthrough paths built to climb out of FLEETSERVE_HOME (`../`, encoded
    `%2e%2e%2f`, double-encoded, backslashes, NUL, absolute paths) open no file outside it and reveal none:
    the log routes, the gateway's /deployments/{name}/{path} passthrough, the console's static files, the
    worker's /logs. Checked by an audit hook that sees every open() of this process while they run."""
    url, p, home = platform_with_replica
    worker_url, _, worker_state = worker
    rid = p.store.replicas("web")[0].id
    # what the routes do serve: the replica's own log, through the API and through the gateway
    lines = httpx.get(f"{url}/api/v1/deployments/web/logs", params={"replica": rid}).json()["lines"]
    assert [x["line"] for x in lines] == ['{"msg": "replica line"}']
    assert httpx.get(f"{url}/deployments/web/logs").json()["lines"]  # the worker's /logs via the passthrough

    requests: list[tuple[str, str]] = []
    for t in TRAVERSALS:
        requests += [(url, f"/api/v1/deployments/{t}/logs"), (url, f"/api/v1/deployments/{t}/logs?follow=true"),
                     (url, f"/api/v1/deployments/web/logs?replica={t}"),
                     (url, f"/api/v1/deployments/web/logs?replica={t}&follow=true"),
                     (url, f"/api/v1/deployments/web/logs?replica={rid}/{t}"),
                     (url, f"/deployments/{t}/logs"), (url, f"/deployments/web/{t}"),
                     (url, f"/deployments/web/logs/{t}"), (url, f"/static/{t}"), (url, f"/{t}"),
                     (worker_url, f"/logs/{t}"), (worker_url, f"/logs?tail=5&file={t}"), (worker_url, f"/{t}")]
    statuses = {}
    with opened_files() as opened:
        for base, path in requests:
            status, headers, text = raw_get(base, path, timeout=1.5)
            check_response(status, headers, text, path, f"GET {base}{path}")
            statuses[path] = status
    homes = [home.resolve(), worker_state.log_file.parent.parent.resolve()]
    outside = sorted({f for f in opened if Path(f).resolve().is_relative_to(sandbox.resolve())
                      and not any(Path(f).resolve().is_relative_to(h) for h in homes)})
    assert outside == [], f"opened outside FLEETSERVE_HOME: {outside}"
    assert not [f for f in opened if "passwd" in f or "shadow" in f], opened
    # traversal names are not deployments: 404, never a file
    assert all(statuses[f"/api/v1/deployments/{t}/logs"] in (404, 422) for t in TRAVERSALS if "/" not in t), statuses

