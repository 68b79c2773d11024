"""The platform end to end with real processes: `fleetserve up`, a 2-replica deployment of the embedded
model, chat through the gateway, logs and metrics, a control-plane restart that keeps state and
service, a SIGKILLed replica replaced, and delete."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from tests.net import free_port, wait_for

pytestmark = pytest.mark.slow



def _start_up(home: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "FLEETSERVE_HOME": str(home)}
    env.pop("FLEETSERVE_API_KEY", None)
    return subprocess.Popen([sys.executable, "-m", "fleetserve", "up", "--port", str(port), "--no-default-deployment",
                             "--keep-replicas"], env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _replica_requests(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("fleetserve_requests_total{") and "/v1/chat/completions" in line)


@pytest.fixture
def platform_home(tmp_path, default_gguf):
    home = tmp_path / "home"
    (home / "models" / "default").mkdir(parents=True)
    shutil.copy(default_gguf, home / "models" / "default" / default_gguf.name)  # no download in tests
    return home


def test_deploy_chat_restart_replace_delete(platform_home, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "up.log"
    up = _start_up(platform_home, port, log)
    replica_pids: list[int] = []
    try:
        wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200, 60, "the platform")
        # bad specs: 422 naming the field; duplicates: 409
        bad = httpx.post(f"{base}/api/v1/deployments", json={"name": "Bad_Name", "model": "default"})
        assert bad.status_code == 422 and "name" in str(bad.json()["detail"][0]["loc"])
        r = httpx.post(f"{base}/api/v1/deployments", json={
            "name": "chat", "model": "default", "replicas": {"min": 2, "max": 2}, "hf_token": "hf_" + "x" * 30,
            "max_model_len": 1024})
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["endpoint"] == f"{base}/v1" and body["spec"]["hf_token_set"] is True
        assert "hf_" + "x" * 30 not in r.text
        assert httpx.post(f"{base}/api/v1/deployments", json={"name": "chat"}).status_code == 409

        d = wait_for(lambda: (x := httpx.get(f"{base}/api/v1/deployments/chat").json())["status"] == "running" and x,
                  300, "two ready replicas")
        assert d["ready_replicas"] == 2 and len(d["replicas"]) == 2
        urls = [rep["url"] for rep in d["replicas"]]
        replica_pids = [rep["pid"] for rep in d["replicas"]]

        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        reply = client.chat.completions.create(model="chat", temperature=0, messages=[
            {"role": "user", "content": "What is the capital of France?"}])
        assert reply.choices[0].message.content == "The capital of France is Paris."
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="chat", temperature=0, stream=True,
            messages=[{"role": "user", "content": "What is the capital of France?"}]) if c.choices)
        assert streamed == "The capital of France is Paris."
        for i in range(12):  # different prompts spread over both replicas
            client.chat.completions.create(model="chat", max_tokens=2, messages=[
                {"role": "user", "content": f"Question number {i}: say a colour."}])
        assert all(_replica_requests(u) > 0 for u in urls), "both replicas serve"
        with pytest.raises(Exception) as missing:
            client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
        assert getattr(missing.value, "status_code", None) == 404

        logs = httpx.get(f"{base}/api/v1/deployments/chat/logs", params={"tail": 5}).json()["lines"]
        assert {item["replica"] for item in logs} == {rep["id"] for rep in d["replicas"]}
        metrics = wait_for(lambda: (m := httpx.get(f"{base}/api/v1/deployments/chat/metrics").json())["series"]
                        and m["current"]["replicas"] == 2 and m, 30, "metrics")
        assert {"requests_per_s", "ttft_p50_ms", "ttft_p95_ms", "tokens_per_s", "queue_depth", "running",
                "kv_usage", "replicas"} <= set(metrics["current"])
        events = httpx.get(f"{base}/api/v1/deployments/chat/events").json()["events"]
        assert [e for e in events if e["reason"] == "ReplicaReady"]

        # the control plane dies: the deployment, its replicas and the service survive a restart
        os.killpg(up.pid, signal.SIGKILL)
        up.wait()
        up = _start_up(platform_home, port, log)
        wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200, 60, "the restarted platform")
        d = wait_for(lambda: (x := httpx.get(f"{base}/api/v1/deployments/chat").json())["status"] == "running" and x,
                  60, "re-adopted replicas")
        assert sorted(rep["pid"] for rep in d["replicas"]) == sorted(replica_pids)  # re-adopted, not restarted
        reply = client.chat.completions.create(model="chat", temperature=0, messages=[
            {"role": "user", "content": "What is the capital of France?"}])
        assert reply.choices[0].message.content == "The capital of France is Paris."

        # a replica killed with SIGKILL is replaced
        os.kill(replica_pids[0], signal.SIGKILL)
        d = wait_for(lambda: (x := httpx.get(f"{base}/api/v1/deployments/chat").json())["status"] == "running"
                  and replica_pids[0] not in [rep["pid"] for rep in x["replicas"]] and x, 300, "a replacement")
        replica_pids = [rep["pid"] for rep in d["replicas"]]
        assert any("exited" in e["message"] for e in
                   httpx.get(f"{base}/api/v1/deployments/chat/events").json()["events"])

        # the token was never stored in plaintext
        db = (platform_home / "fleetserve.db").read_bytes()
        assert b"hf_" + b"x" * 30 not in db

        # delete: replicas stop, then 404
        assert httpx.delete(f"{base}/api/v1/deployments/chat").status_code == 202
        wait_for(lambda: httpx.get(f"{base}/api/v1/deployments/chat").status_code == 404, 60, "deletion")
        wait_for(lambda: not any(_alive(p) for p in replica_pids), 30, "replicas to exit")
    finally:
        os.killpg(up.pid, signal.SIGKILL)
        up.wait()
        for pid in replica_pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its dead parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False
