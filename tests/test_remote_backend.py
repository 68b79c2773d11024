"""The remote backend: launch engine processes from a plan, wait for readiness, proxy /v1 (streams
untouched), translate the engine's metrics, keep fleetserve's /health, fail loudly when an engine dies.

Engines here are stand-ins launched through the real launcher: a fake SGLang server serving a recorded
SGLang /metrics sample (fast), and a real fleetserve native worker (`python -m fleetserve serve`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from fleetserve.engine.remote import metrics_translate as mt
from fleetserve.engine.remote.launcher import EngineLauncher, LaunchError
from fleetserve.planner.types import Process
from tests.net import free_port

FIXTURES = Path(__file__).parent / "fixtures" / "remote"
SGLANG_METRICS = (FIXTURES / "sglang_metrics.txt").read_text()
VLLM_METRICS = (FIXTURES / "vllm_metrics.txt").read_text()
ROOT = Path(__file__).resolve().parent.parent



# ---------------------------------------------------------------- metrics translation (recorded samples)


def test_sglang_metrics_translate_to_fleetserve_names():
    t = mt.translate([mt.EngineScrape("engine", "unified", SGLANG_METRICS)])
    assert (t.running, t.waiting, t.kv_cache_usage, t.prefix_cache_hit_rate) == (12.0, 5.0, 0.37, 0.42)
    assert (t.tokens_per_second, t.prompt_tokens, t.generation_tokens) == (1834.5, 482133.0, 201877.0)
    assert (t.spec_accept_rate, t.spec_accept_length) == (0.53, 2.6)
    ttft = t.histograms["time_to_first_token_seconds"]
    assert ttft["0.1"] == 310.0 and ttft["+Inf"] == 1290.0 and ttft["_count"] == 1290.0 and ttft["_sum"] == 301.7
    text = mt.render_translated(t)
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["fleetserve_num_requests_waiting"].samples[0].value == 5.0
    assert fams["fleetserve_queue_depth"].samples[0].value == 17.0
    assert fams["fleetserve_generation_tokens"].type == "counter"
    assert fams["fleetserve_time_to_first_token_seconds"].type == "histogram"
    assert fams["fleetserve_spec_accept_rate"].samples[0].value == 0.53


def test_vllm_metrics_translate_and_rates_are_computed():
    t = mt.translate([mt.EngineScrape("engine", "unified", VLLM_METRICS)])
    assert (t.running, t.waiting, t.kv_cache_usage) == (7.0, 2.0, 0.25)
    assert t.prefix_cache_hit_rate == 0.25 and t.spec_accept_rate == 0.75
    assert t.histograms["time_to_first_token_seconds"]["0.5"] == 95.0


def test_pd_translation_sums_engines_and_takes_latency_from_decode():
    scrapes = [mt.EngineScrape("prefill-0", "prefill", SGLANG_METRICS),
               mt.EngineScrape("decode-0", "decode", SGLANG_METRICS.replace("} 12.0", "} 3.0")),
               mt.EngineScrape("decode-1", "decode", "")]  # a scrape that failed
    t = mt.translate(scrapes)
    assert t.running == 15.0 and t.waiting == 10.0
    assert t.prompt_tokens == 482133.0 and t.generation_tokens == 201877.0  # prefill's prompts, decode's tokens
    assert t.histograms["time_to_first_token_seconds"]["+Inf"] == 1290.0  # decode only, not doubled
    raw = mt.passthrough(scrapes)
    assert 'sglang:num_running_reqs{engine_type="unified",model_name="Qwen/Qwen2.5-7B-Instruct",pp_rank="0",' \
           'tp_rank="0",process="prefill-0"} 12.0' in raw
    assert raw.count("# TYPE sglang:num_running_reqs gauge") == 1


def test_single_engine_series_pass_through_unchanged():
    raw = mt.passthrough([mt.EngineScrape("engine", "unified", SGLANG_METRICS)])
    assert raw == SGLANG_METRICS
    assert mt.translate([mt.EngineScrape("e", "unified", "not prometheus {{{")]).found is False
    assert mt.render_translated(mt.Translated()) == ""


def test_drop_families():
    text = ("# HELP fleetserve_queue_depth x\n# TYPE fleetserve_queue_depth gauge\nfleetserve_queue_depth 0.0\n"
            "# HELP fleetserve_requests requests\n# TYPE fleetserve_requests counter\nfleetserve_requests_total 3.0\n")
    assert mt.drop_families(text, ["fleetserve_queue_depth"]) == (
        "# HELP fleetserve_requests requests\n# TYPE fleetserve_requests counter\nfleetserve_requests_total 3.0\n")


# ---------------------------------------------------------------- the launcher


def fake_engine(name: str, port: int, role: str = "unified", *extra: str) -> Process:
    argv = ["python3", str(FIXTURES / "fake_engine.py"), str(port), str(FIXTURES / "sglang_metrics.txt"), *extra]
    return Process(name, role, [], 1, port, argv, {"FAKE_ENGINE_NAME": name})


async def test_launcher_waits_for_readiness_and_stops(tmp_path):
    port = free_port()
    launcher = EngineLauncher([fake_engine("engine", port)], tmp_path, {"HF_TOKEN": "hf_x"}, python=sys.executable)
    launcher.start()
    try:
        await launcher.wait_ready(timeout_s=30, poll_s=0.1)
        assert launcher.ready and launcher.failed() is None
        (info,) = launcher.describe()
        assert info["ready"] and info["exit_code"] is None and info["url"] == f"http://127.0.0.1:{port}"
    finally:
        launcher.stop(grace_s=5)
    assert launcher.failed() is not None  # stopped


async def test_launcher_reports_an_engine_that_exits(tmp_path):
    proc = Process("engine", "unified", [], 1, free_port(), ["python3", "-c", "import sys; print('boom: no GPU'); "
                                                               "sys.exit(7)"])
    launcher = EngineLauncher([proc], tmp_path, python=sys.executable)
    launcher.start()
    with pytest.raises(LaunchError, match=r"engine process engine exited with code 7; last log lines:\nboom: no GPU"):
        await launcher.wait_ready(timeout_s=30, poll_s=0.1)
    launcher.stop()


# ---------------------------------------------------------------- the worker in front (a real subprocess)

RUNNER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from fleetserve.config import ServeConfig
    from fleetserve.planner.types import Process
    from fleetserve.server.remote_app import run_remote_server
    a = json.loads(Path(sys.argv[1]).read_text())
    cfg = ServeConfig(port=a["port"], log_file=a["log_file"], api_keys=a.get("api_keys", []), drain_timeout_s=5)
    run_remote_server(cfg, [Process.from_dict(p) for p in a["processes"]], backend=a["backend"],
                      entry_url=a["entry_url"], served_model_name="m", pd_mode=a.get("pd_mode", False),
                      pd_bootstrap_port=a.get("pd_bootstrap_port"), log_dir=Path(a["log_dir"]),
                      ready_timeout_s=a.get("ready_timeout_s", 120), spec_num_steps=2)
""")


class Front:
    def __init__(self, tmp_path: Path, processes: list[Process], entry_url: str, **extra) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = {"port": self.port, "log_file": str(tmp_path / "worker.log"), "log_dir": str(tmp_path / "engines"),
                "processes": [p.to_dict() for p in processes], "entry_url": entry_url, "backend": "sglang", **extra}
        (tmp_path / "args.json").write_text(json.dumps(args))
        (tmp_path / "runner.py").write_text(RUNNER)
        self.proc = subprocess.Popen([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "args.json")],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def wait(self, path: str = "/readyz", timeout: float = 120) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read().decode()[-3000:]
            try:
                r = self.client.get(path)
                if r.status_code == 200:
                    return r
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{path} not 200 after {timeout}s")

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def front_factory(tmp_path):
    fronts: list[Front] = []

    def make(processes, entry_url, **extra) -> Front:
        f = Front(tmp_path, processes, entry_url, **extra)
        fronts.append(f)
        return f

    yield make
    for f in fronts:
        f.close()


def test_front_proxies_streams_translates_metrics_and_reports_pd(front_factory):
    prefill, decode, router = free_port(), free_port(), free_port()
    procs = [fake_engine("router", router, "router"), fake_engine("prefill-0", prefill, "prefill"),
             fake_engine("decode-0", decode, "decode")]
    front = front_factory(procs, f"http://127.0.0.1:{router}", pd_mode=True, pd_bootstrap_port=8998,
                          api_keys=["front-key-123"])
    front.wait("/healthz")
    before = front.client.get("/health").json()
    assert before["engine_status"] in ("loading", "ready")
    front.wait()
    h = front.client.get("/health").json()
    assert h["status"] == "ok" and h["engine_status"] == "ready" and h["backend"] == "sglang"
    assert h["pd_mode"] is True and h["pd_bootstrap_port"] == 8998 and h["hathora_region"] is None
    assert {"model_path", "timestamp"} <= set(h)
    assert [p["name"] for p in h["processes"]] == ["prefill-0", "decode-0", "router"]  # engines first

    auth = {"Authorization": "Bearer front-key-123", "X-Request-ID": "req-abc123"}
    assert front.client.post("/v1/chat/completions", json={"messages": []}).status_code == 401
    r = front.client.post("/v1/chat/completions", json={"messages": [], "stream": False}, headers=auth)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Paris"
    assert r.json()["seen"] == {"auth": None, "request_id": "req-abc123"}  # our key stays with us
    assert r.headers["x-request-id"] == "req-abc123"

    chunks = []
    with front.client.stream("POST", "/v1/chat/completions", json={"messages": [], "stream": True},
                             headers=auth) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:])["choices"][0]["delta"]["content"])
    assert "".join(chunks) == "The capital is Paris."

    metrics = front.client.get("/metrics").text
    assert "fleetserve_num_requests_running 24.0" in metrics  # prefill + decode, not the router
    assert "fleetserve_num_requests_waiting 10.0" in metrics and "fleetserve_kv_cache_usage 0.37" in metrics
    assert "fleetserve_spec_accept_rate 0.53" in metrics
    assert 'sglang:num_queue_reqs{engine_type="unified",model_name="Qwen/Qwen2.5-7B-Instruct",pp_rank="0",' \
           'tp_rank="0",process="decode-0"} 5.0' in metrics
    assert 'fleetserve_requests_total{route="/v1/{path:path}",status="200"}' in metrics
    from prometheus_client.parser import text_string_to_metric_families

    names = [f.name for f in text_string_to_metric_families(metrics)]
    assert len(names) == len(set(names))  # no family twice
    logs = front.client.get("/logs", params={"process": "decode-0"}, headers=auth)
    assert logs.status_code == 200 and logs.json()["process"] == "decode-0"


def test_engine_death_fails_health_and_exits_nonzero(front_factory):
    port = free_port()
    front = front_factory([fake_engine("engine", port, "unified", "--exit-after", "2")], f"http://127.0.0.1:{port}")
    front.wait()
    deadline = time.monotonic() + 30
    while front.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert front.proc.returncode == 1, front.proc.stdout.read().decode()[-2000:]
    output = front.proc.stdout.read().decode()
    assert "engine process engine exited with code 3" in output


@pytest.mark.slow
def test_native_worker_as_the_engine(front_factory, tmp_path, default_gguf):
    """A real fleetserve native worker launched through the same launcher path answers through the front."""
    port = free_port()
    engine = Process("engine", "unified", [], 1, port,
                     ["python3", "-m", "fleetserve", "serve", "--port", str(port), "--log-file",
                      str(tmp_path / "native.log"), "--max-batch-tokens", "512"], ready_path="/readyz")
    front = front_factory([engine], engine.url)
    front.wait("/healthz")
    assert front.client.get("/readyz").status_code in (200, 503)
    front.wait(timeout=180)
    body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "What is the capital of "
                                                                                        "France?"}],
            "max_tokens": 12, "temperature": 0}
    models = front.client.get("/v1/models").json()
    body["model"] = models["data"][0]["id"]
    r = front.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["message"]["content"]
    assert "Paris" in text
    streamed = []
    with front.client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"]
                streamed.append(delta.get("content") or "")
    assert "".join(streamed) == text  # greedy: the stream carries exactly the same text
    health = front.client.get("/health").json()
    pid = health["processes"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while front.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert front.proc.returncode == 1
