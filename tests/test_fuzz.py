"""Property-based fuzzing of both HTTP surfaces: the worker's OpenAPI schema (a real uvicorn server on a
tiny random Llama, so generation is cheap) and the control plane's (a platform whose providers start
nothing), with schemathesis, plus hand-written hypothesis strategies for what schema-driven generation
does not reach: bytes that are not UTF-8, lone surrogates, huge numbers, deep nesting, wrong content
types, oversized bodies, and path parameters that try to leave FLEETSERVE_HOME.

What must hold for every input: no 5xx (a 503 only as deliberate backpressure, with Retry-After), an
answer within a per-request timeout (no hang), OpenAI's error shape on /v1, and no file outside the
state directory ever opened on behalf of a request.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import schemathesis
import torch
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetserve.config import ServeConfig
from fleetserve.control.platform import Platform, create_platform_app
from fleetserve.control.providers.base import Liveness
from fleetserve.control.store import ReplicaRow
from fleetserve.engine.native.engine import EngineConfig, NativeEngine
from fleetserve.models import resolve_model
from fleetserve.server.app import create_app, new_state
from fleetserve.tokenizer import Tokenizer
from tests.reference import write_tiny_checkpoint

REQUEST_TIMEOUT_S = 30.0  # a request that takes longer than this counts as a hang
MAX_BODY = 64 << 10  # the fuzzed worker's --max-body-bytes (small, so 413 is cheap to reach)
FUZZ = settings(max_examples=int(os.environ.get("FLEETSERVE_FUZZ_EXAMPLES", "30")), deadline=None,
                derandomize=True, database=None, suppress_health_check=list(HealthCheck))
CANARY = "fleetserve-canary-7d1f0c"  # content of files outside FLEETSERVE_HOME that no response may reveal


# ---- servers ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(app):
    """The app under uvicorn on a loopback port, in a background thread; yields the base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                            log_level="warning")
    config.install_signal_handlers = False
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"fuzz-uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


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
def worker(tiny, tmp_path_factory):
    """(base URL, app, state) of the real worker app on the tiny engine, with a log file under its home."""
    path, tok, engine = tiny
    home = tmp_path_factory.mktemp("worker-home")
    state = new_state(ServeConfig(model=str(path), max_body_bytes=MAX_BODY, max_new_tokens=16),
                      resolve_model(str(path), download=False))
    state.engine, state.tokenizer = engine, tok
    state.log_file = home / "logs" / "worker.log"
    state.log_file.parent.mkdir(parents=True)
    state.log_file.write_text('{"msg": "a line"}\n')
    app = create_app(state, load=False)
    with serve_in_thread(app) as url:
        yield url, app, state


def wait_idle(engine, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if s.running == 0 and s.waiting == 0 and engine.block_manager.num_used == 0:
            return
        assert time.monotonic() < deadline, f"engine not idle: {s}, blocks used {engine.block_manager.num_used}"
        time.sleep(0.05)


# ---- what every response must satisfy -------------------------------------------------------------------


def check_no_server_error(response, path: str) -> None:
    """No 5xx; a 503 only as deliberate backpressure (Retry-After), never a crash."""
    status = response.status_code
    assert status < 500 or (status == 503 and "retry-after" in {k.lower() for k in response.headers}), (
        f"{status} on {path}: {response.text[:500]}")


def check_openai_error_shape(response, path: str) -> None:
    """On /v1, every 4xx/5xx body is {"error": {"message", "type", "param", "code"}} with a message."""
    if not path.startswith("/v1/") or response.status_code < 400:
        return
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


def check_no_canary(response) -> None:
    assert CANARY not in response.text and "root:x:0:0" not in response.text


GENERATION_CAP = 8  # tokens per fuzzed generation: the fuzzer explores parameters, not long outputs


def cap_generation(case) -> None:
    """Bound the work a valid generation request asks for (a fuzzed max_tokens of 10**9 is still sent when it
    is invalid, and absent or small values are capped), so the fuzzing budget goes into input variety."""
    body = case.body
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens", "max_new_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1 << 20:
            body[key] = min(value, GENERATION_CAP)
    if case.path in ("/v1/chat/completions", "/v1/completions") and "max_tokens" not in body \
            and "max_completion_tokens" not in body:
        body["max_tokens"] = GENERATION_CAP


# ---- the worker's schema ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_schema(worker):
    url, app, _ = worker
    schema = schemathesis.openapi.from_dict(app.openapi())
    schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE,
                                           schemathesis.GenerationMode.NEGATIVE])
    schema.config.update(base_url=url)
    return schema


worker_schema_lazy = schemathesis.pytest.from_fixture("worker_schema")


@worker_schema_lazy.parametrize()
@FUZZ
def test_worker_schema(case, worker):
    url, _, _ = worker
    cap_generation(case)
    response = case.call(base_url=url, timeout=REQUEST_TIMEOUT_S)
    check_no_server_error(response, case.path)
    check_openai_error_shape(response, case.path)
    check_no_canary(response)
