"""End to end on "Hathora": the platform (in-process, Hathora provider built from HATHORA_* env) against the
strict fake of the Hathora API, whose rooms run REAL `fleetserve serve` workers configured only by the
deployment's env. A deployment reaches running, chat goes through the gateway to the room's URL, /health
reports the region and process id, logs come from the logs API, scaling 1 -> 2 -> 1 creates and destroys
rooms (drain = stop the process), delete cleans up, and the HF token goes nowhere but the HF_TOKEN env
entry of the Hathora deployment."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import pytest

from fleetserve.control.platform import Platform, create_platform_app
from fleetserve.control.providers.hathora_client import HathoraClient
from tests.hathora_fake import FakeHathora, container_base_env

pytestmark = pytest.mark.slow

TOKEN = "hf_" + "E2e" * 11
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def fake(tmp_path, default_gguf):
    image_home = tmp_path / "image-home"  # the "container image": fleetserve with the default model cached
    (image_home / "models" / "default").mkdir(parents=True)
    shutil.copy(default_gguf, image_home / "models" / "default" / default_gguf.name)
    f = FakeHathora(tmp_path / "fake", base_env=container_base_env(image_home)).start()
    yield f
    f.stop()


async def wait_for(c, name, pred, what, timeout=150.0):
    deadline = time.monotonic() + timeout
    d = None
    while time.monotonic() < deadline:
        r = await c.get(f"/api/v1/deployments/{name}")
        d = r.json() if r.status_code == 200 else {"status_code": r.status_code}
        if pred(d):
            return d
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; last: {d}")


async def test_hathora_deployment_end_to_end(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("HATHORA_TOKEN", fake.token)
    monkeypatch.setenv("HATHORA_API_URL", fake.url)  # loopback: replica URLs are http:// (no TLS edge here)
    monkeypatch.delenv("HATHORA_APP_ID", raising=False)
    fake.burst_429, fake.retry_after = 2, "1"  # the first calls are rate limited: retried, invisible to users
    home = tmp_path / "home"
    p = Platform(home, "http://127.0.0.1:1", default_deployment=False, reconcile_interval_s=0.2)
    app = create_platform_app(p)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     timeout=120) as c:
            r = await c.post("/api/v1/deployments", json={
                "name": "hchat", "model": "default", "provider": "hathora", "region": "seattle",
                "hf_token": TOKEN, "max_model_len": 1024, "replicas": {"min": 1, "max": 1}})
            assert r.status_code == 201, r.text
            assert r.json()["spec"]["region"] == "Seattle" and TOKEN not in r.text
            d = await wait_for(c, "hchat", lambda d: d["status"] == "running", "a running room")
            (rep,) = d["replicas"]
            assert rep["url"].startswith("http://127.0.0.1:")
            (room,) = fake.live_rooms()
            assert room.room_id == rep["id"] and room.status == "active"
            proc = fake.processes[room.process_id]
            assert rep["url"] == f"http://127.0.0.1:{proc.port}"

            # chat through the gateway, to the room
            reply = await c.post("/v1/chat/completions", json={"model": "hchat", "temperature": 0,
                                                                "messages": QUESTION})
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"] == "The capital of France is Paris."

            # the worker was configured by the deployment's env alone, and knows where it runs
            async with httpx.AsyncClient() as direct:
                health = (await direct.get(f"{rep['url']}/health")).json()
                assert health["hathora_region"] == "Seattle" and health["hathora_process_id"] == proc.process_id
                assert health["model"] == "hchat" and health["max_model_len"] == 1024
                denied = await direct.post(f"{rep['url']}/v1/chat/completions",
                                           json={"model": "hchat", "messages": QUESTION})
                assert denied.status_code == 401  # only the gateway holds the internal key
            assert set(proc.env) >= {"DEPLOYMENT_CONFIG_JSON", "FLEETSERVE_SERVED_MODEL_NAME", "HF_TOKEN",
                                     "FLEETSERVE_API_KEY", "HATHORA_DEFAULT_PORT", "HATHORA_REGION",
                                     "HATHORA_PROCESS_ID", "HATHORA_HOSTNAME"}

            # the room's process, as Hathora reports it: running in its region, with metrics
            api = HathoraClient(fake.token, fake.url)
            running = await api.latest_processes(proc.app_id, status=["running"], region=["Seattle"])
            assert [x.process_id for x in running] == [proc.process_id]
            assert running[0].exposed_port.port == proc.port and running[0].exposed_port.transport_type == "tls"
            metrics = await api.process_metrics(proc.app_id, proc.process_id, ("cpu", "memory"))
            assert metrics["memory"][0].value > 50e6  # the worker holds the model
            await api.aclose()

            # logs come from Hathora's logs API
            lines = (await c.get("/api/v1/deployments/hchat/logs", params={"tail": 30})).json()["lines"]
            assert lines and {x["replica"] for x in lines} == {rep["id"]}
            assert [x["line"] for x in lines] == proc.log_path.read_text().splitlines()[-30:]
            assert any(q["path"] == f"/logs/v1/{proc.app_id}/process/{proc.process_id}" for q in fake.requests)

            # scale 1 -> 2: a second room; 2 -> 1: one room drained (process stopped) and destroyed
            r = await c.patch("/api/v1/deployments/hchat", json={"replicas": {"min": 2, "max": 2}})
            assert r.status_code == 200
            d = await wait_for(c, "hchat", lambda d: d["status"] == "running" and d["ready_replicas"] == 2,
                               "two ready rooms")
            assert len(fake.live_rooms()) == 2 and len(fake.running_processes()) == 2
            for i in range(6):
                ok = await c.post("/v1/chat/completions", json={"model": "hchat", "max_tokens": 2, "messages": [
                    {"role": "user", "content": f"Say a number, {i}."}]})
                assert ok.status_code == 200
            r = await c.patch("/api/v1/deployments/hchat", json={"replicas": {"min": 1, "max": 1}})
            d = await wait_for(c, "hchat", lambda d: d["status"] == "running" and len(d["replicas"]) == 1
                               and len(fake.live_rooms()) == 1 and len(fake.running_processes()) == 1,
                               "scale down to one room")
            stopped = [q for q in fake.requests if q["path"].endswith("/stop")]
            destroyed = [q for q in fake.requests if "/rooms/v2/" in q["path"] and "/destroy/" in q["path"]]
            assert len(stopped) == 1 and len(destroyed) == 1
            gone = [pr for pr in fake.processes.values() if pr.popen.poll() is not None]
            assert len(gone) == 1 and gone[0].status == "stopped" and gone[0].popen.returncode == 0  # drained
            # one build and one deployment for the whole life: the spec never changed
            assert len([q for q in fake.requests if q["path"] == "/builds/v3/builds/registry"]) == 1
            assert len([q for q in fake.requests if q["method"] == "POST" and q["path"].endswith("/deployments")]) == 1
            events = (await c.get("/api/v1/deployments/hchat/events", params={"limit": 1000})).json()["events"]
            assert not [e for e in events if e["reason"] == "ReplicaFailed"]

            # delete: every room destroyed, every process stopped
            assert (await c.delete("/api/v1/deployments/hchat")).status_code == 202
            await wait_for(c, "hchat", lambda d: d.get("status_code") == 404, "deletion", timeout=60)
            deadline = time.monotonic() + 30
            while fake.running_processes() or fake.live_rooms():
                assert time.monotonic() < deadline, (fake.running_processes(), fake.live_rooms())
                await asyncio.sleep(0.2)

    # the HF token went exactly once over the wire: as the HF_TOKEN env entry of the one deployment
    traffic = fake.all_traffic()
    assert traffic.count(TOKEN) == 1
    (create,) = [q for q in fake.requests if q["method"] == "POST" and q["path"].endswith("/deployments")]
    env = json.loads(create["body"])["env"]
    assert [e["name"] for e in env if TOKEN in e["value"]] == ["HF_TOKEN"]
    assert not [q for q in fake.requests if TOKEN in q["query"] or TOKEN in json.dumps(q["headers"])]
    # ... and nowhere at rest: not in the platform's database, the worker logs, or any deployment tag
    assert TOKEN.encode() not in (home / "fleetserve.db").read_bytes()
    for path in list((tmp_path / "fake").rglob("*.log")) + list((tmp_path / "image-home").rglob("*.log*")):
        assert TOKEN not in path.read_text(errors="replace"), path
    assert all(TOKEN not in (dep["deploymentTag"] or "") for dep in fake.deployments.values())
    assert fake.requests[0]["path"] == "/apps/v2/apps"  # no HATHORA_APP_ID: the app was created on first use
