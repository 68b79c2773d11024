"""Faults a serving fleet meets in production, injected for real:

- hundreds of clients that hang up mid-stream (then every KV block is free and nothing runs);
- a client that reads one chunk per second (the other streams do not wait for it: counted in engine steps);
- a log file that cannot be written, at start (unwritable directory) and while running (disk full);
- a replica SIGKILLed mid-stream behind the gateway (its own streams end with an error event then
  `[DONE]`, the others finish, new requests go to the survivor, the reconciler replaces it).

The worker-level faults run against the real app under uvicorn in this process, on a tiny random Llama
(every step is cheap); the log directory and the replica kill use real `fleetserve` processes
(`@pytest.mark.slow`).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
import torch

from fleetserve import logs
from fleetserve.config import ServeConfig
from fleetserve.engine.native.engine import EngineConfig, NativeEngine
from fleetserve.models import resolve_model
from fleetserve.server.app import create_app, new_state
from fleetserve.tokenizer import Tokenizer
from tests.net import free_port, serve_in_thread, wait_for
from tests.reference import write_tiny_checkpoint
from tests.worker_apps import value

STORY = "Once upon a time"




@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with a 2048-token context, saved as a HF directory."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-faults"), "llama", tokenizer,
                                 max_position_embeddings=2048)


@pytest.fixture(scope="module")
def live(tiny_dir):
    """(url, state, engine): the real worker app on the tiny model, served by uvicorn in this process."""
    tok = Tokenizer.from_hf_dir(tiny_dir)
    engine = NativeEngine.load("hf", tiny_dir, tok.eos_token_ids,
                               EngineConfig(max_model_len=1024, kv_cache_tokens=1 << 17, max_queue_len=512),
                               torch.device("cpu"), torch.float32)
    engine.start()
    state = new_state(ServeConfig(model=str(tiny_dir)), resolve_model(str(tiny_dir), download=False))
    state.engine, state.tokenizer = engine, tok
    try:
        with serve_in_thread(create_app(state, load=False)) as url:
            yield url, state, engine
    finally:
        engine.stop()


def wait_idle(engine, state=None, timeout: float = 30.0) -> None:
    """Until nothing runs or waits, every KV block is free, and (with `state`) no HTTP request is in flight."""
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        busy = (s.running, s.waiting, engine.block_manager.num_used, state.in_flight if state else 0)
        if busy == (0, 0, 0, 0):
            return
        assert time.monotonic() < deadline, f"not idle after {timeout}s: running, waiting, blocks, in flight = {busy}"
        time.sleep(0.05)


# ---- clients that hang up ------------------------------------------------------------------------------------


async def test_hundreds_of_clients_disconnecting_mid_stream_free_everything(live):
    """200 streams (chat and completions) each closed by its client right after the first chunk: every
    engine sequence is aborted, every KV block freed, nothing left running, waiting or in flight."""
    url, state, engine = live
    wait_idle(engine, state)
    before = copy.copy(engine.stats())  # stats() updates one object in place
    n, max_tokens = 200, 600

    async def one(c: httpx.AsyncClient, i: int) -> str:
        if i % 2:
            path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Tell story {i}"}]}
        else:
            path, body = "/v1/completions", {"prompt": f"{STORY} number {i}"}
        body |= {"stream": True, "max_tokens": max_tokens, "ignore_eos": True}
        async with c.stream("POST", f"{url}{path}", json=body) as r:
            assert r.status_code == 200, await r.aread()
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen == 1 + (i % 2):  # chat's first chunk only carries the role: wait for a token's
                    return line  # leaving the block closes the connection mid-stream
        raise AssertionError("stream ended before its first chunk")

    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        firsts = await asyncio.gather(*(one(c, i) for i in range(n)))
    assert all(f != "data: [DONE]" and "error" not in f for f in firsts)
    await asyncio.to_thread(wait_idle, engine, state)
    after = engine.stats()
    assert after.generation_tokens - before.generation_tokens < n * max_tokens // 4  # stopped, not run out
    assert after.aborts - before.aborts >= n * 0.9  # (a few may not have been admitted before the hang-up)
    async with httpx.AsyncClient(timeout=30) as c:
        metrics = (await c.get(f"{url}/metrics")).text
        assert value(metrics, "fleetserve_kv_cache_usage") == 0
        assert value(metrics, "fleetserve_num_requests_running") == 0
        assert value(metrics, "fleetserve_requests_in_flight") == 0
        # and the worker serves normally afterwards
        r = await c.post(f"{url}/v1/completions", json={"prompt": STORY, "max_tokens": 5, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


async def test_clients_that_time_out_on_non_streaming_requests_free_everything(live):
    """50 non-streaming requests whose clients give up (timeout) before the answer: aborted, blocks freed."""
    url, state, engine = live
    wait_idle(engine, state)
    before = copy.copy(engine.stats())

    async def one(c: httpx.AsyncClient, i: int) -> None:
        with pytest.raises(httpx.TimeoutException):
            await c.post(f"{url}/v1/completions", json={"prompt": f"{STORY} {i}", "max_tokens": 1000,
                                                        "ignore_eos": True}, timeout=0.5)

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64, max_keepalive_connections=0)) as c:
        await asyncio.gather(*(one(c, i) for i in range(50)))
    await asyncio.to_thread(wait_idle, engine, state)
    assert engine.stats().generation_tokens - before.generation_tokens < 50 * 1000 // 4


# ---- a slow reader ----------------------------------------------------------------------------------------


class SlowReader(threading.Thread):
    """A raw-socket client with a tiny receive buffer that reads `chunk` bytes per `interval` seconds, so the
    server's writes to it block on TCP flow control almost at once."""

    def __init__(self, url: str, path: str, body: dict, chunk: int = 1024, interval: float = 1.0):
        super().__init__(daemon=True, name="slow-reader")
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        self.sock.connect((host, int(port)))
        payload = json.dumps(body).encode()
        self.sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        self.chunk, self.interval = chunk, interval
        self.received = 0
        self.stop = threading.Event()

    def run(self) -> None:
        self.sock.settimeout(5)
        while not self.stop.is_set():
            try:
                data = self.sock.recv(self.chunk)
            except OSError:
                return
            if not data:
                return
            self.received += len(data)
            self.stop.wait(self.interval)

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.join(10)


def _streams_steps(url: str, engine, k: int = 8, tokens: int = 24) -> tuple[int, list[int]]:
    """Engine steps from sending `k` concurrent greedy streams until their clients have read `[DONE]`, and
    the tokens each one received."""
    body = {"max_tokens": tokens, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    counts: list[int] = [0] * k
    start = engine.stats().steps

    def one(i: int) -> None:
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{url}/v1/completions",
                                                     json={**body, "prompt": f"Fact {i}:"}) as r:
            assert r.status_code == 200
            lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        counts[i] = json.loads(lines[-2])["usage"]["completion_tokens"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return engine.stats().steps - start, counts


def test_a_slow_reader_does_not_stall_other_streams(live):
    """While one client reads a large stream at 1 KiB per second (the server's writes to it are blocked by
    TCP flow control), 8 other streams finish in the same number of engine steps as with no slow reader.
    Steps are counted, not timed: the slow reader's own sequence keeps the engine stepping, so any wait
    on it would show up as extra steps before the others' [DONE]."""
    url, state, engine = live
    wait_idle(engine, state)
    alone, counts = _streams_steps(url, engine)
    assert counts == [24] * 8
    big = {"prompt": STORY, "max_tokens": 900, "ignore_eos": True, "stream": True, "logprobs": 5}
    reader = SlowReader(url, "/v1/completions", big)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while engine.stats().running == 0:  # its sequence is being decoded
            assert time.monotonic() < deadline
            time.sleep(0.01)
        steps_before = engine.stats().steps
        with_slow, counts = _streams_steps(url, engine)
        assert counts == [24] * 8
        assert engine.stats().running >= 1 or engine.stats().steps - steps_before < 900  # it was still decoding
        # +12 steps (about a second of engine time) absorbs the 8 requests arriving a few steps apart on a
        # loaded machine (seen: 25 vs 31); a stalled event loop costs many more, the slow reader's 900 at most
        assert with_slow <= alone + 12, (alone, with_slow)
        assert reader.received < 200_000  # and it really was slow: far behind what was generated for it
    finally:
        reader.close()
    wait_idle(engine, state)  # its abort freed its blocks too


# ---- the log file ------------------------------------------------------------------------------------------


@contextmanager
def _restore_logging():
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in [h for h in root.handlers if h not in before]:
            root.removeHandler(h)
            try:
                h.close()  # flushes: on a full disk that fails too
            except OSError:
                pass
        for h in [h for h in before if h not in root.handlers]:
            root.addHandler(h)
        root.setLevel(level)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
async def test_log_file_that_fails_while_running_does_not_stop_serving(live, capsys):
    """A log file that starts failing mid-run (disk full: every write to /dev/full is ENOSPC): requests are
    still served and logged to stderr; the failed writes are reported there, never raised into a request."""
    url, _, _ = live
    with _restore_logging():
        error = logs.setup_logging("info", json_logs=True, log_file=Path("/dev/full"))
        assert error is None  # opening it works; writing fails
        async with httpx.AsyncClient(timeout=30) as c:
            for _ in range(3):
                r = await c.post(f"{url}/v1/completions", json={"prompt": STORY, "max_tokens": 3})
                assert r.status_code == 200
            assert (await c.get(f"{url}/health")).json()["status"] == "ok"
    err = capsys.readouterr().err
    assert "/v1/completions" in err  # the access log still reached stderr


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLEETSERVE_", "HATHORA_")) and k not in {
               "PORT", "HOST", "MODEL_PATH", "MAX_TOTAL_TOKENS", "LOG_LEVEL", "DEPLOYMENT_CONFIG_JSON", "HF_TOKEN"}}
    return {**env, "FLEETSERVE_HOME": str(home), "HF_HUB_OFFLINE": "1"}


def test_unwritable_log_directory_worker_serves_and_reports_it(tiny_dir, tmp_path):
    """`fleetserve serve --log-file` in a directory that cannot be created or written: the real process starts,
    serves, says why on stderr, and reports `log_file_error` in /health (`/logs` answers 503 with it)."""
    if os.geteuid() == 0:  # root writes into 0555 directories: make the directory impossible instead
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("a file where the log directory should be")
        log_file = blocker / "logs" / "worker.log"
    else:
        ro = tmp_path / "read-only"
        ro.mkdir(mode=0o555)
        log_file = ro / "worker.log"
    port = free_port()
    out = tmp_path / "serve.out"
    proc = subprocess.Popen([sys.executable, "-m", "fleetserve", "serve", "--model", str(tiny_dir), "--port",
                             str(port), "--log-file", str(log_file), "--kv-cache-tokens", "4096"],
                            env=_clean_env(tmp_path / "home"), stdout=out.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, 120, "readiness", proc, out)
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok"
        assert health["log_file_error"] and str(log_file.parent) in health["log_file_error"]
        r = httpx.post(f"{url}/v1/completions", json={"prompt": STORY, "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        logs_resp = httpx.get(f"{url}/logs")
        assert logs_resp.status_code == 503 and logs_resp.json()["detail"] == health["log_file_error"]
        assert "cannot write the log file" in out.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


# ---- a replica killed mid-stream behind the gateway ------------------------------------------------------------


def _sse_stream(url: str, body: dict, out: dict, started: threading.Event | None = None) -> None:
    """Reads one stream to its end; `out`: data lines, and whether the connection ended cleanly."""
    out["lines"] = []
    try:
        with httpx.Client(timeout=httpx.Timeout(120, connect=10)) as c, \
                c.stream("POST", f"{url}/v1/completions", json=body) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out["lines"].append(line[6:])
                    if started is not None and len(out["lines"]) == 1:
                        started.set()
        out["clean"] = True
    except httpx.HTTPError as exc:
        out["clean"] = False
        out["exc"] = repr(exc)


def _running(replica_url: str) -> float:
    return value(httpx.get(f"{replica_url}/metrics", timeout=5).text, "fleetserve_num_requests_running")


def _kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, TypeError):
            pass


@pytest.mark.slow
def test_replica_killed_mid_stream_only_its_streams_fail_and_it_is_replaced(tiny_dir, tmp_path):
    """`fleetserve up` with a 2-replica deployment of the tiny model; 8 long streams through the gateway; one
    replica SIGKILLed mid-stream. Its streams (exactly as many as it was running) end with an OpenAI-shaped
    error event and then `[DONE]`; the other replica's finish completely; requests sent right after the kill
    all succeed (on the survivor); the reconciler starts a replacement and the deployment is running again."""
    home = tmp_path / "home"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out = tmp_path / "up.out"
    up = subprocess.Popen([sys.executable, "-m", "fleetserve", "up", "--port", str(port), "--no-default-deployment"],
                          env=_clean_env(home), stdout=out.open("wb"), stderr=subprocess.STDOUT,
                          start_new_session=True)
    pids: set[int] = set()
    try:
        wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200, 60, "the platform", up, out)
        r = httpx.post(f"{base}/api/v1/deployments", json={
            "name": "tiny", "model": str(tiny_dir), "replicas": {"min": 2, "max": 2}, "max_model_len": 2048,
            "engine_args": {"kv_cache_tokens": 65536}})
        assert r.status_code == 201, r.text
        d = wait_for(lambda: (x := httpx.get(f"{base}/api/v1/deployments/tiny").json())["status"] == "running" and x,
                  180, "two ready replicas", up, out)
        reps = {rep["pid"]: rep["url"] for rep in d["replicas"]}
        pids |= set(reps)

        body = {"model": "tiny", "max_tokens": 1800, "ignore_eos": True, "stream": True, "temperature": 0}
        results = [{} for _ in range(8)]
        started = [threading.Event() for _ in results]
        threads = [threading.Thread(target=_sse_stream, args=(base, {**body, "prompt": f"Stream {i}: {STORY}"},
                                                                 results[i], started[i])) for i in range(8)]
        for t in threads:
            t.start()
        for ev in started:
            assert ev.wait(60), "a stream did not start"
        running = {pid: _running(url) for pid, url in reps.items()}
        assert sum(running.values()) == 8, running
        victim = max(running, key=running.get)
        survivor = next(pid for pid in reps if pid != victim)
        served_before = _chat_count(reps[survivor])
        os.kill(victim, signal.SIGKILL)

        # requests that had not started: the survivor takes all of them (connect errors are retried elsewhere)
        after = [httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": f"after {i}",
                                                             "max_tokens": 3}, timeout=60) for i in range(6)]
        assert [x.status_code for x in after] == [200] * 6, [x.text for x in after]
        assert _chat_count(reps[survivor]) - served_before >= 6  # (its own long streams may end meanwhile)

        for t in threads:
            t.join(180)
        failed = [x for x in results if x["lines"] and x["lines"][-2:-1] and '"error"' in x["lines"][-2]]
        finished = [x for x in results if x not in failed]
        assert len(failed) == running[victim], [x["lines"][-3:] for x in results]
        for x in results:
            assert x["status"] == 200 and x["clean"], x  # every stream ends properly: no hang-up, no hang
            assert x["lines"][-1] == "[DONE]", x["lines"][-3:]
        for x in failed:
            err = json.loads(x["lines"][-2])["error"]
            assert err["code"] == "replica_failed" and err["type"] == "server_error" and err["message"]
        for x in finished:
            chunks = [json.loads(line) for line in x["lines"][:-1]]
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            assert "error" not in x["lines"][-2]

        # the reconciler replaces the killed replica
        d = wait_for(lambda: (x := httpx.get(f"{base}/api/v1/deployments/tiny").json())["status"] == "running"
                  and victim not in [rep["pid"] for rep in x["replicas"]] and x, 180, "a replacement", up, out)
        pids |= {rep["pid"] for rep in d["replicas"]}
        assert len(d["replicas"]) == 2 and survivor in [rep["pid"] for rep in d["replicas"]]
        events = httpx.get(f"{base}/api/v1/deployments/tiny/events").json()["events"]
        assert any(e["reason"] == "ReplicaExited" and "exited" in e["message"] for e in events)
        r = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": STORY, "max_tokens": 3}, timeout=60)
        assert r.status_code == 200
    finally:
        try:
            pids |= {c.pid for c in psutil.Process(up.pid).children(recursive=True)}
        except psutil.Error:
            pass
        os.killpg(up.pid, signal.SIGKILL)
        up.wait()
        _kill_all(pids)


def _chat_count(replica_url: str) -> float:
    text = httpx.get(f"{replica_url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("fleetserve_requests_total{") and '"/v1/completions"' in line
               and 'status="200"' in line)


# ---- the soak, shortened for CI ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_soak_one_minute_against_a_real_worker(tiny_dir, tmp_path):
    """`benchmarks/soak.py` for 60 s (128 streams) against `python -m fleetserve serve` on the tiny model: no
    error other than 429, RSS flat after warm-up, KV usage and open fds back to their baselines, exit 0.

    The worker runs with a fixed glibc mmap threshold: with glibc's adaptive one, freed tensor buffers stay in
    the heap and RSS climbs for minutes before it levels off, which a 1-minute run cannot tell from a leak
    (docs/reliability.md has the measurements; the 10-minute soak runs with the defaults)."""
    port = free_port()
    out = tmp_path / "serve.out"
    env = {**_clean_env(tmp_path / "home"), "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.Popen([sys.executable, "-m", "fleetserve", "serve", "--model", str(tiny_dir), "--port", str(port),
                             "--max-model-len", "512"], env=env, stdout=out.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, 120, "readiness", proc, out)
        report = tmp_path / "soak.json"
        soak = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "benchmarks" / "soak.py"),
                               "--url", url, "--pid", str(proc.pid), "--duration", "60", "--warmup", "15",
                               "--concurrency", "128", "--max-tokens", "24", "--json", str(report), "--quiet",
                               # 1 minute cannot tell early allocator growth from a leak (seen +11.5% at
                               # load 4); the 10-minute record run holds the 10% line (docs/reliability.md)
                               "--max-rss-growth", "0.25"],
                              capture_output=True, text=True, timeout=180)
        assert soak.returncode == 0, soak.stdout + soak.stderr
        result = json.loads(report.read_text())
        assert result["passed"] and result["errors"] == 0 and result["ok"] > 100, result["criteria"]
        assert all(v == 0 for v in result["kv_usage_after"].values())
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()


# ---- the reconciler under flapping readiness (no processes: a scripted provider) ------------------------------


class ScriptedProvider:
    """Replicas whose liveness and readiness the test sets; records what the reconciler kills."""

    name = "scripted"

    def __init__(self):
        self.alive: dict[str, bool] = {}
        self.ready_now: dict[str, bool] = {}
        self.killed: list[str] = []

    async def start(self, spec, replica_id, generation):
        from fleetserve.control.store import ReplicaRow

        self.alive[replica_id], self.ready_now[replica_id] = True, True
        return ReplicaRow(replica_id, spec.name, generation, 1, 4242, "http://127.0.0.1:1", "starting", time.time(),
                          None)

    async def observe(self, r):
        from fleetserve.control.providers.base import Liveness

        return Liveness(self.alive.get(r.id, False), -9, "killed")

    async def ready(self, r, client):
        return self.ready_now.get(r.id, False)

    async def stop(self, r, force=False):
        if force:
            self.killed.append(r.id)
            self.alive[r.id] = False

    async def release(self, r):
        pass

    async def logs(self, r, tail):
        return []

    def log_file(self, r):
        return None


async def test_a_ready_replica_that_flaps_then_dies_is_an_exit_not_a_failed_start(tmp_path):
    """A replica that was ready, fails a readiness probe (overloaded, or dying) and then exits is replaced at once
    as `ReplicaExited` (no failure count, no backoff), and a long-running replica whose probe fails is not killed
    by the *start* timeout. (Both happened before: the SIGKILL test above caught the first.)"""
    from fleetserve.control import reconciler as rec
    from fleetserve.control.secrets import SecretBox
    from fleetserve.control.spec import DeploymentSpec
    from fleetserve.control.store import Store

    store = Store(tmp_path / "db.sqlite", SecretBox(tmp_path / "secret.key"))
    provider = ScriptedProvider()
    r = rec.Reconciler(store, provider)
    store.create(DeploymentSpec(name="web", replicas={"min": 1, "max": 1}))
    try:
        await r.reconcile(store.get("web"))  # starts one
        await r.reconcile(store.get("web"))  # it is ready
        (rep,) = store.replicas("web")
        assert rep.status == "ready"
        # long past the start timeout, its probe fails: out of routing, but not killed
        rep.started_at = time.time() - rec.START_TIMEOUT_S - 100
        store.put_replica(rep)
        provider.ready_now[rep.id] = False
        await r.reconcile(store.get("web"))
        await r.reconcile(store.get("web"))
        assert provider.killed == [] and store.replicas("web")[0].status == "starting"
        # now it dies: an exit, replaced at once
        provider.alive[rep.id] = False
        await r.reconcile(store.get("web"))
        reasons = [e["reason"] for e in store.events("web")]
        assert "ReplicaExited" in reasons and "ReplicaFailed" not in reasons, store.events("web")
        assert r.health["web"].failures == 0
        assert len(store.replicas("web")) == 1 and store.replicas("web")[0].id != rep.id
    finally:
        await r._client.aclose()
