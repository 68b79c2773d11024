"""Metrics, request ids, access log, log file and /logs: the real worker app on the embedded model."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.responses import StreamingResponse

from fleetserve.config import ServeConfig, resolve_log_file
from fleetserve.engine.types import EngineStats
from fleetserve.logs import request_id_var, tail_lines
from fleetserve.server.app import configure_worker_logging
from fleetserve.server.metrics import WorkerMetrics
from tests.worker_apps import STORY, client, families, file_logging, make_app, samples, value

README = Path(__file__).resolve().parents[1] / "README.md"
COMPLETION = {"prompt": STORY, "max_tokens": 6, "temperature": 0, "ignore_eos": True}

EXPECTED_FAMILIES = {
    "fleetserve_requests": "counter",
    "fleetserve_prompt_tokens": "counter",
    "fleetserve_generation_tokens": "counter",
    "fleetserve_engine_requests_finished": "counter",
    "fleetserve_engine_steps": "counter",
    "fleetserve_engine_preemptions": "counter",
    "fleetserve_engine_prompt_tokens_computed": "counter",
    "fleetserve_prefix_cache_queried_tokens": "counter",
    "fleetserve_prefix_cache_hit_tokens": "counter",
    "fleetserve_spec_decode_draft_tokens": "counter",
    "fleetserve_spec_decode_accepted_tokens": "counter",
    "fleetserve_spec_decode_verifications": "counter",
    "fleetserve_spec_decode_acceptance_rate": "gauge",
    "fleetserve_time_to_first_token_seconds": "histogram",
    "fleetserve_inter_token_latency_seconds": "histogram",
    "fleetserve_e2e_request_latency_seconds": "histogram",
    "fleetserve_info": "gauge",
    "fleetserve_num_requests_running": "gauge",
    "fleetserve_num_requests_waiting": "gauge",
    "fleetserve_queue_depth": "gauge",
    "fleetserve_requests_in_flight": "gauge",
    "fleetserve_kv_cache_usage": "gauge",
    "fleetserve_prefix_cache_hit_rate": "gauge",
    "fleetserve_tokens_per_second": "gauge",
    "fleetserve_draining": "gauge",
}


# ---- metrics -----------------------------------------------------------------------------------


async def test_metrics_count_a_known_request_exactly(default_engine, tokenizer):
    app, _ = make_app(default_engine, tokenizer)
    async with client(app) as c:
        r = await c.post("/v1/completions", json=COMPLETION)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        m = await c.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert families(text) == EXPECTED_FAMILIES
    assert usage["completion_tokens"] == 6
    assert value(text, "fleetserve_requests_total", route="/v1/completions", status="200") == 1
    assert value(text, "fleetserve_prompt_tokens_total") == usage["prompt_tokens"]
    assert value(text, "fleetserve_generation_tokens_total") == 6
    assert value(text, "fleetserve_engine_requests_finished_total", finish_reason="length") == 1
    assert value(text, "fleetserve_time_to_first_token_seconds_count") == 1
    assert value(text, "fleetserve_inter_token_latency_seconds_count") == 5  # one per token after the first
    assert value(text, "fleetserve_e2e_request_latency_seconds_count") == 1
    ttft = value(text, "fleetserve_time_to_first_token_seconds_sum")
    e2e = value(text, "fleetserve_e2e_request_latency_seconds_sum")
    itl = value(text, "fleetserve_inter_token_latency_seconds_sum")
    assert 0 < ttft < e2e and 0 < itl < e2e
    assert value(text, "fleetserve_tokens_per_second") > 0
    assert value(text, "fleetserve_num_requests_running") == 0
    assert value(text, "fleetserve_num_requests_waiting") == 0
    assert value(text, "fleetserve_requests_in_flight") == 0
    assert 0 <= value(text, "fleetserve_prefix_cache_hit_rate") <= 1
    assert 0 <= value(text, "fleetserve_kv_cache_usage") <= 1
    assert value(text, "fleetserve_draining") == 0
    assert value(text, "fleetserve_engine_steps_total") > 0
    info = [k for k in samples(text) if k[0] == "fleetserve_info"]
    assert dict(info[0][1])["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


async def test_metrics_increment_by_streamed_usage_and_count_statuses(default_engine, tokenizer):
    """A streaming chat with n=2: tokens += the usage the client saw, one TTFT/e2e per choice."""
    app, _ = make_app(default_engine, tokenizer)
    async with client(app) as c:
        before = (await c.get("/metrics")).text
        body = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "temperature": 0.8,
                "seed": 7, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        usage = json.loads(events[-2])["usage"]
        assert (await c.get("/v1/nope")).status_code == 404
        assert (await c.post("/v1/completions", json={"prompt": STORY, "max_tokens": -1})).status_code == 400
        after = (await c.get("/metrics")).text

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("fleetserve_generation_tokens_total") == usage["completion_tokens"]
    assert delta("fleetserve_prompt_tokens_total") == 2 * usage["prompt_tokens"]  # one engine request per choice
    assert delta("fleetserve_time_to_first_token_seconds_count") == 2
    assert delta("fleetserve_e2e_request_latency_seconds_count") == 2
    finished = sum(delta("fleetserve_engine_requests_finished_total", finish_reason=r) for r in ("stop", "length"))
    assert finished == 2
    assert delta("fleetserve_requests_total", route="/v1/chat/completions", status="200") == 1
    assert delta("fleetserve_requests_total", route="unmatched", status="404") == 1
    assert delta("fleetserve_requests_total", route="/v1/completions", status="400") == 1
    assert delta("fleetserve_requests_total", route="/metrics", status="200") == 1  # the first scrape


async def test_engine_gauges_are_read_at_scrape_time(default_engine, tokenizer):
    app, state = make_app(default_engine, tokenizer)
    async with client(app) as c:
        task = asyncio.create_task(c.post("/v1/completions", json={**COMPLETION, "max_tokens": 40}))
        seen = None
        for _ in range(400):
            text = (await c.get("/metrics")).text
            if value(text, "fleetserve_num_requests_running") == 1:
                seen = text
                break
            await asyncio.sleep(0.02)
        assert seen is not None, "the running request never showed in /metrics"
        assert value(seen, "fleetserve_queue_depth") >= 1
        assert 0 < value(seen, "fleetserve_kv_cache_usage") <= 1
        assert value(seen, "fleetserve_requests_in_flight") == 1  # the completion; scrapes are not counted
        r = await task
        assert r.status_code == 200
        text = (await c.get("/metrics")).text
    assert value(text, "fleetserve_num_requests_running") == 0
    assert value(text, "fleetserve_requests_in_flight") == 0 and state.in_flight == 0
    assert value(text, "fleetserve_generation_tokens_total") == 40


async def test_prefix_cache_hits_show_in_metrics(default_engine, tokenizer):
    """The same long prompt twice: the second one's prefix comes from the cache, and the gauges say so."""
    app, _ = make_app(default_engine, tokenizer)
    prompt = "A list of the planets of the solar system, with one fact about each of them: " * 4
    async with client(app) as c:
        before = (await c.get("/metrics")).text
        for _ in range(2):
            r = await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "temperature": 0})
            assert r.status_code == 200
        after = (await c.get("/metrics")).text
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    hits = value(after, "fleetserve_prefix_cache_hit_tokens_total") - value(before, "fleetserve_prefix_cache_hit_tokens_total")
    queried = (value(after, "fleetserve_prefix_cache_queried_tokens_total")
               - value(before, "fleetserve_prefix_cache_queried_tokens_total"))
    assert 0 < hits <= queried <= 2 * prompt_tokens
    stats = default_engine.stats()
    assert value(after, "fleetserve_prefix_cache_hit_rate") == pytest.approx(stats.prefix_cache_hit_rate)
    assert value(after, "fleetserve_prefix_cache_hit_rate") > 0


def test_engine_stats_fields_added_later_are_read():
    """Gauges read EngineStats with getattr defaults: a field like prefix_cache_hit_rate shows up when it exists."""

    @dataclass
    class LaterStats(EngineStats):
        prefix_cache_hit_rate: float = 0.25

    class Engine:
        def stats(self):
            return LaterStats(running=2, waiting=3, kv_blocks_total=10, kv_blocks_used=4)

    text = WorkerMetrics(lambda: Engine()).render().decode()
    assert value(text, "fleetserve_prefix_cache_hit_rate") == 0.25
    assert value(text, "fleetserve_num_requests_running") == 2
    assert value(text, "fleetserve_num_requests_waiting") == 3
    assert value(text, "fleetserve_queue_depth") == 5
    assert value(text, "fleetserve_kv_cache_usage") == pytest.approx(0.4)
    # No engine yet (loading): every gauge is 0, and the scrape still works.
    text = WorkerMetrics(lambda: None).render().decode()
    assert value(text, "fleetserve_num_requests_running") == 0 and value(text, "fleetserve_kv_cache_usage") == 0


async def test_two_apps_in_one_process_keep_separate_metrics(default_engine, tokenizer):
    app1, _ = make_app(default_engine, tokenizer)
    app2, _ = make_app(default_engine, tokenizer)
    async with client(app1) as c1, client(app2) as c2:
        assert (await c1.post("/v1/completions", json={**COMPLETION, "max_tokens": 2})).status_code == 200
        t1, t2 = (await c1.get("/metrics")).text, (await c2.get("/metrics")).text
    assert value(t1, "fleetserve_generation_tokens_total") == 2
    assert value(t2, "fleetserve_generation_tokens_total") == 0
    assert value(t2, "fleetserve_requests_total", route="/v1/completions", status="200") == 0


def test_every_metric_is_documented_in_the_readme():
    readme = README.read_text()
    section = readme[readme.index("## Metrics"):]
    section = section[:section.find("\n## ", 4)] if "\n## " in section[4:] else section
    for name, kind in EXPECTED_FAMILIES.items():
        shown = f"{name}_total" if kind == "counter" else name
        assert f"`{shown}`" in section, f"{shown} is not documented in README 'Metrics'"


# ---- request ids -------------------------------------------------------------------------------


async def test_request_id_is_echoed_or_generated(default_engine, tokenizer):
    app, _ = make_app(default_engine, tokenizer)
    async with client(app) as c:
        r = await c.get("/v1/models", headers={"X-Request-ID": "gw-7f3a.12:abc"})
        assert r.headers["x-request-id"] == "gw-7f3a.12:abc"
        a, b = await c.get("/healthz"), await c.get("/v1/models")
        for resp in (a, b):
            assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["x-request-id"])
        assert a.headers["x-request-id"] != b.headers["x-request-id"]
        # Not id-shaped (spaces, too long): replaced, never reflected.
        for bad in ("two words", "x" * 200, "a\tb"):
            r = await c.get("/healthz", headers={"X-Request-ID": bad})
            assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
        # Errors carry one too, and every response has X-Process-Time in seconds.
        r = await c.post("/v1/completions", json={"prompt": STORY, "max_tokens": -1},
                         headers={"X-Request-ID": "err-1"})
        assert r.status_code == 400 and r.headers["x-request-id"] == "err-1"
        assert 0 <= float(r.headers["x-process-time"]) < 60


async def test_log_lines_carry_the_request_id(default_engine, tokenizer, tmp_path):
    app, _ = make_app(default_engine, tokenizer, log_file=tmp_path / "worker.log")
    inner = logging.getLogger("fleetserve.test")

    @app.get("/test/log")
    async def log_something():
        inner.info("inside the handler")
        return {"request_id": request_id_var.get()}

    @app.get("/test/stream")
    async def stream_something():
        async def body():
            yield "a"
            await asyncio.sleep(0)
            inner.info("inside the stream")
            yield "b"
        return StreamingResponse(body())

    with file_logging(tmp_path / "worker.log"):
        async with client(app) as c:
            r = await c.post("/v1/chat/completions", headers={"X-Request-ID": "rid-chat-1"},
                             json={"messages": [{"role": "user", "content": "The capital of France?"}],
                                   "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200
            assert (await c.get("/test/log", headers={"X-Request-ID": "rid-log-2"})).json() == {
                "request_id": "rid-log-2"}
            assert (await c.get("/test/stream", headers={"X-Request-ID": "rid-stream-3"})).text == "ab"
            assert (await c.get("/healthz")).status_code == 200
    entries = [json.loads(line) for line in (tmp_path / "worker.log").read_text().splitlines()]
    access = [e for e in entries if e["logger"] == "fleetserve.access"]
    (chat,) = [e for e in access if e["request_id"] == "rid-chat-1"]
    assert (chat["method"], chat["path"], chat["status"]) == ("POST", "/v1/chat/completions", 200)
    assert chat["duration_s"] > 0 and chat["level"] == "info"
    assert [e["request_id"] for e in entries if e["msg"] == "inside the handler"] == ["rid-log-2"]
    assert [e["request_id"] for e in entries if e["msg"] == "inside the stream"] == ["rid-stream-3"]
    # One access line per request; probes only at debug; never the body.
    assert [e["path"] for e in access] == ["/v1/chat/completions", "/test/log", "/test/stream"]
    assert "France" not in (tmp_path / "worker.log").read_text()


# ---- log file and /logs ------------------------------------------------------------------------


async def test_logs_tail_returns_exactly_the_last_lines(default_engine, tokenizer, tmp_path):
    log_file = tmp_path / "worker.log"
    app, _ = make_app(default_engine, tokenizer, log_file=log_file)
    with file_logging(log_file):
        async with client(app) as c:
            for i in range(12):
                logging.getLogger("fleetserve.test").info("line %d", i)
            r = await c.get("/logs", params={"tail": 5})
            assert r.status_code == 200
            body = r.json()
            file_lines = log_file.read_text().splitlines()
            # The file now ends with the access line of /logs itself, written after the response.
            assert json.loads(file_lines[-1])["path"] == "/logs"
            assert body["lines"] == file_lines[-6:-1]
            assert [json.loads(x)["msg"] for x in body["lines"]] == [f"line {i}" for i in range(7, 12)]
            assert body["log_file"] == str(log_file)
            everything = (await c.get("/logs")).json()["lines"]  # default 100: more than there are
            assert everything == log_file.read_text().splitlines()[:-1]
            for bad in (0, -1, 10001, "x"):
                r = await c.get("/logs", params={"tail": bad})
                assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "tail"]
            assert (await c.get("/logs", params={"tail": 10000})).status_code == 200


def test_tail_lines_reads_backwards_in_blocks(tmp_path):
    path = tmp_path / "big.log"
    lines = [f"entry {i} " + "x" * (i % 37) for i in range(2000)]
    path.write_text("\n".join(lines) + "\n")
    for n in (1, 5, 99, 1999, 2000, 5000):
        assert tail_lines(path, n, block_size=64) == lines[-n:]
    path.write_text("a\nb\nc")  # no trailing newline
    assert tail_lines(path, 2) == ["b", "c"]
    path.write_text("")
    assert tail_lines(path, 3) == []


async def test_unwritable_log_file_is_reported_and_serving_continues(default_engine, tokenizer, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = ServeConfig(log_file=blocker / "logs" / "worker.log")
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        path, error = configure_worker_logging(cfg, json_logs=True)
    finally:
        for h in [h for h in root.handlers if h not in before]:
            root.removeHandler(h)
        root.setLevel(level)
    assert path == blocker / "logs" / "worker.log"
    assert error is not None and str(path.parent) in error and "cannot write the log file" in error
    assert "cannot write the log file" in capsys.readouterr().err  # told on stderr
    app, state = make_app(default_engine, tokenizer)
    state.log_file_error = error
    async with client(app) as c:
        health = (await c.get("/health")).json()
        assert health["log_file_error"] == error and health["status"] == "ok"
        r = await c.get("/logs")
        assert r.status_code == 503 and r.json()["detail"] == error
        assert (await c.post("/v1/completions", json={**COMPLETION, "max_tokens": 2})).status_code == 200


async def test_health_reports_log_file_and_drain_state(default_engine, tokenizer, tmp_path):
    app, _ = make_app(default_engine, tokenizer, log_file=tmp_path / "w.log")
    async with client(app) as c:
        h = (await c.get("/health")).json()
    assert h["log_file"] == str(tmp_path / "w.log") and h["log_file_error"] is None
    assert h["draining"] is False and h["requests_in_flight"] == 0  # health probes are not counted
    for key in ("status", "engine_status", "model_path", "timestamp", "hathora_region"):
        assert key in h


def test_default_log_file_is_under_fleetserve_home(tmp_path):
    assert resolve_log_file(ServeConfig(port=8123), env={"FLEETSERVE_HOME": str(tmp_path)}) == \
        tmp_path / "logs" / "worker-8123.log"
    assert resolve_log_file(ServeConfig(log_file=tmp_path / "x.log"), env={}) == tmp_path / "x.log"
    assert resolve_log_file(ServeConfig(), env={}).name == "worker-8000.log"
