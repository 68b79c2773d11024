"""Graceful drain: in process (the flag, the wait, the server hook) and end to end with SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn

from fleetserve.server.drain import DrainingServer, drain, outstanding
from tests.net import free_port
from tests.worker_apps import STORY, client, make_app, value

COMPLETION = {"prompt": STORY, "temperature": 0, "ignore_eos": True}



async def test_draining_worker_refuses_new_work_and_is_not_ready(default_engine, tokenizer):
    app, state = make_app(default_engine, tokenizer)
    async with client(app) as c:
        assert (await c.get("/readyz")).status_code == 200
        state.draining = True
        r = await c.get("/readyz")
        assert r.status_code == 503 and r.json() == {"status": "draining"}
        for path, body in (("/v1/completions", {**COMPLETION, "max_tokens": 2}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            r = await c.post(path, json=body)
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["type"] == "service_unavailable" and err["code"] == "draining"
            assert "shutting down" in err["message"] and int(r.headers["retry-after"]) > 0
        assert (await c.get("/v1/models")).status_code == 200  # reads stay open
        h = (await c.get("/health")).json()
        assert h["engine_status"] == "draining" and h["draining"] is True and h["status"] == "draining"
        assert value((await c.get("/metrics")).text, "fleetserve_draining") == 1


async def test_drain_waits_for_requests_in_flight(default_engine, tokenizer):
    app, state = make_app(default_engine, tokenizer)
    async with client(app) as c:
        task = asyncio.create_task(c.post("/v1/completions", json={**COMPLETION, "max_tokens": 24}))
        for _ in range(500):
            if default_engine.stats().running and state.in_flight:
                break
            await asyncio.sleep(0.02)
        assert outstanding(state) >= 2  # the HTTP request and the engine's running sequence
        drained = asyncio.create_task(drain(state, timeout_s=120))
        await asyncio.sleep(0.05)
        assert state.draining and not drained.done()
        late = await c.post("/v1/completions", json={**COMPLETION, "max_tokens": 2})
        assert late.status_code == 503
        assert await drained is True
        r = task.result()  # the drain ended only after the request had finished
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 24
        assert outstanding(state) == 0


async def test_drain_gives_up_after_the_timeout(default_engine, tokenizer):
    _, state = make_app(default_engine, tokenizer)
    state.in_flight = 1  # a request that never finishes
    start = time.monotonic()
    assert await drain(state, timeout_s=0.3) is False
    assert 0.3 <= time.monotonic() - start < 5


async def test_drain_timeout_cancels_requests_and_frees_the_engine(default_engine, tokenizer, caplog):
    app, state = make_app(default_engine, tokenizer)
    async with client(app) as c:
        for stream in (False, True):
            task = asyncio.create_task(c.post("/v1/completions",
                                              json={**COMPLETION, "max_tokens": 1000, "stream": stream}))
            for _ in range(500):
                if default_engine.stats().running and state.in_flight:
                    break
                await asyncio.sleep(0.02)
            assert default_engine.stats().running == 1
            with caplog.at_level(logging.INFO):
                assert await drain(state, timeout_s=0.2) is False
            await asyncio.gather(task, return_exceptions=True)
            assert state.in_flight == 0 and not state.request_tasks
            for _ in range(200):  # the cancelled request's engine sequence is aborted, its blocks freed
                if default_engine.stats().running == 0 and default_engine.stats().waiting == 0:
                    break
                await asyncio.sleep(0.02)
            assert default_engine.stats().running == 0
            state.draining = False
    cut = [r for r in caplog.records if r.name == "fleetserve.access" and "cut off by the drain timeout" in r.getMessage()]
    assert len(cut) == 2 and all(r.levelno == logging.WARNING for r in cut)


def test_signal_hook_drains_then_exits_without_re_raising(default_engine, tokenizer):
    """What SIGTERM does in `fleetserve serve`, called directly (signals only reach the main thread)."""
    app, state = make_app(default_engine, tokenizer)
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None, access_log=False)
    server = DrainingServer(config, state, drain_timeout_s=10)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.02)
    server.handle_exit(signal.SIGTERM, None)
    assert state.draining  # at once, before any request could slip in
    thread.join(30)
    assert not thread.is_alive() and server.should_exit
    assert server._captured_signals == []  # nothing re-raised: the process exits 0


# ---- end to end --------------------------------------------------------------------------------


def _serve_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLEETSERVE_", "HATHORA_")) and k not in {"PORT", "HOST", "MODEL_PATH",
                                                                          "MAX_TOTAL_TOKENS", "LOG_LEVEL",
                                                                          "DEPLOYMENT_CONFIG_JSON", "HF_TOKEN"}}
    if "FLEETSERVE_HOME" in os.environ:
        env["FLEETSERVE_HOME"] = os.environ["FLEETSERVE_HOME"]
    env["HF_HUB_OFFLINE"] = "1"
    return env


class Stream(threading.Thread):
    """One streaming completion read line by line; records what arrived."""

    def __init__(self, url: str, i: int):
        super().__init__(daemon=True)
        self.url, self.i = url, i
        self.first = threading.Event()
        self.events: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.done = False
        self.error: Exception | None = None

    def run(self) -> None:
        body = {**COMPLETION, "prompt": f"{STORY} there was a village number {self.i}", "max_tokens": 60,
                "stream": True, "stream_options": {"include_usage": True}}
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=120) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    self.events.append(data)
                    self.first.set()
                    if data == "[DONE]":
                        self.done = True
                        continue
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        self.usage = chunk["usage"]
                    for choice in chunk["choices"]:
                        self.finish_reason = choice["finish_reason"] or self.finish_reason
        except Exception as exc:  # noqa: BLE001 (reported by the test)
            self.error = exc
            self.first.set()


@pytest.mark.slow
def test_sigterm_drains_streams_then_exits_zero(default_gguf, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out = (tmp_path / "serve.out").open("w+")
    log_file = tmp_path / "worker.log"
    proc = subprocess.Popen([sys.executable, "-m", "fleetserve", "serve", "--port", str(port), "--max-model-len",
                             "1024", "--kv-cache-tokens", "4096", "--log-file", str(log_file), "--drain-timeout", "300"], stdout=out, stderr=subprocess.STDOUT,
                            env=_serve_env())
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"serve exited early:\n{(tmp_path / 'serve.out').read_text()}"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "not ready within 180 s"
            time.sleep(0.3)

        streams = [Stream(url, i) for i in range(8)]
        for s in streams:
            s.start()
        for s in streams:
            assert s.first.wait(120), "no first chunk"
            assert s.error is None, s.error
        proc.send_signal(signal.SIGTERM)

        # Not ready at once, and new work is refused while the streams are still running.
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        try:
            late = httpx.post(f"{url}/v1/completions", json={**COMPLETION, "max_tokens": 2}, timeout=10)
            assert late.status_code == 503 and late.headers["retry-after"]
            assert late.json()["error"]["code"] == "draining"
        except httpx.ConnectError:  # already gone: only possible if every stream had finished
            assert all(s.done for s in streams)
        assert not all(s.done for s in streams), "the streams finished before the drain could be observed"

        for s in streams:
            s.join(120)
            assert not s.is_alive()
            assert s.error is None, s.error
            assert s.finish_reason == "length" and s.done and s.events[-1] == "[DONE]"
            assert s.usage and s.usage["completion_tokens"] == 60
        assert proc.wait(timeout=60) == 0
        try:
            httpx.get(f"{url}/healthz", timeout=2)
            raise AssertionError("the server still answers after exiting")
        except httpx.TransportError:
            pass
        output = (tmp_path / "serve.out").read_text()
        assert "Traceback" not in output, output
        messages = [json.loads(line).get("msg", "") for line in log_file.read_text().splitlines()]
        assert any(m.startswith("draining: ") for m in messages)
        assert any(m.startswith("drained in ") for m in messages)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
