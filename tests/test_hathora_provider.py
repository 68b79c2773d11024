"""The Hathora provider inside the platform (in-process), against the strict fake of the API: what it
sends (build, deployment, room), reuse of builds and deployments, and API errors (401, 404, 422, 429, 5xx,
a failed build) surfacing as clear deployment states and events. The fake's "containers" here are idle
processes that never listen (the real worker runs in tests/test_hathora_e2e.py)."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx
import pytest

from fleetserve.control import reconciler as reconciler_mod
from fleetserve.control.platform import Platform, create_platform_app
from fleetserve.control.providers.hathora import DEFAULT_IMAGE, HathoraProvider, worker_env
from fleetserve.control.providers.hathora_client import HathoraClient
from fleetserve.control.spec import DeploymentSpec
from tests.hathora_fake import FakeHathora

TOKEN = "hf_" + "p" * 34
IDLE = [sys.executable, "-c", "import time; time.sleep(120)"]


@pytest.fixture
def fake(tmp_path):
    f = FakeHathora(tmp_path / "fake", command=IDLE).start()
    yield f
    f.stop()


@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(reconciler_mod, "BACKOFF_BASE_S", 0.01)


def platform_with(tmp_path, fake, token=None, app_id=None, delays=None):
    box: dict = {}

    async def sleep(s: float) -> None:
        if delays is not None:
            delays.append(s)

    def make() -> HathoraProvider:
        client = HathoraClient(token or fake.token, fake.url, sleep=sleep)
        return HathoraProvider(client, tmp_path / "home", box["p"].gateway.internal_key, app_id, build_poll_s=0.01)

    p = Platform(tmp_path / "home", "http://127.0.0.1:1", default_deployment=False, reconcile_interval_s=0.05,
                 providers={"hathora": make})
    box["p"] = p
    return p


async def wait_for(c, name, pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        d = (await c.get(f"/api/v1/deployments/{name}")).json()
        if pred(d):
            return d
        assert time.monotonic() < deadline, d
        await asyncio.sleep(0.05)


async def run(p, body, pred, timeout=20.0):
    app = create_platform_app(p)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/api/v1/deployments", json=body)
            assert r.status_code == 201, r.text
            d = await wait_for(c, body["name"], pred, timeout)
            events = (await c.get(f"/api/v1/deployments/{body['name']}/events")).json()["events"]
            return d, events


def spec(**kw):
    return {"name": "hat", "model": "default", "provider": "hathora", "region": "Frankfurt", **kw}


def test_worker_env_carries_the_config_and_the_token_only_as_hf_token():
    s = DeploymentSpec(name="x", model="org/m", provider="hathora", region="Tokyo", hf_token=TOKEN,
                       max_model_len=512, engine_args={"max_batch_tokens": 256})
    env = {e.name: e.value for e in worker_env(s, "fsi-internal-key-123")}
    assert set(env) == {"DEPLOYMENT_CONFIG_JSON", "FLEETSERVE_SERVED_MODEL_NAME", "FLEETSERVE_API_KEY", "HF_TOKEN"}
    assert json.loads(env["DEPLOYMENT_CONFIG_JSON"]) == {"model": "org/m", "precision": "auto", "device": "auto",
                                                         "max_model_len": 512, "max_batch_tokens": 256}
    assert env["HF_TOKEN"] == TOKEN and env["FLEETSERVE_SERVED_MODEL_NAME"] == "x"
    assert sum(TOKEN in v for v in env.values()) == 1
    from fleetserve.config import load_serve_config  # the worker accepts exactly this env

    cfg, sources = load_serve_config({}, env={**env, "HATHORA_DEFAULT_PORT": "7777", "HATHORA_REGION": "Tokyo"})
    assert (cfg.model, cfg.served_model_name, cfg.port, cfg.host) == ("org/m", "x", 7777, "0.0.0.0")
    assert cfg.max_batch_tokens == 256 and cfg.hf_token.get_secret_value() == TOKEN
    assert cfg.hathora_region == "Tokyo" and len(cfg.api_keys) == 1


async def test_room_in_region_with_build_and_deployment_per_contract(tmp_path, fake):
    p = platform_with(tmp_path, fake)
    d, events = await run(p, spec(hf_token=TOKEN, cpu=1, memory_mb=2048),
                          lambda d: len(d["replicas"]) == 1 and fake.rooms)
    assert d["status"] in ("starting", "pending")
    reqs = fake.requests
    build_run = [r for r in reqs if r["path"].endswith("/runRegistry")]
    assert json.loads(build_run[0]["body"]) == {"image": DEFAULT_IMAGE}
    assert DEFAULT_IMAGE.startswith("ghcr.io/fleetserve/fleetserve:") and DEFAULT_IMAGE.endswith("-cpu")
    dep = json.loads([r for r in reqs if r["path"].endswith("/deployments") and r["method"] == "POST"][0]["body"])
    assert dep["transportType"] == "tls" and dep["containerPort"] == 8000 and dep["roomsPerProcess"] == 1
    assert dep["idleTimeoutEnabled"] is False and dep["requestedCPU"] == 1 and dep["requestedMemoryMB"] == 2048
    assert {e["name"] for e in dep["env"]} == {"DEPLOYMENT_CONFIG_JSON", "FLEETSERVE_SERVED_MODEL_NAME",
                                               "FLEETSERVE_API_KEY", "HF_TOKEN"}
    room = [r for r in reqs if "/rooms/v2/" in r["path"] and r["path"].endswith("/create")][0]
    assert json.loads(room["body"])["region"] == "Frankfurt" and room["query"] == f"roomId={d['replicas'][0]['id']}"
    assert fake.all_traffic().count(TOKEN) == 1  # only the HF_TOKEN env entry of the deployment
    assert TOKEN not in json.dumps(events) and TOKEN.encode() not in (tmp_path / "home" / "fleetserve.db").read_bytes()


async def test_build_and_deployment_are_reused_while_the_spec_is_unchanged(tmp_path, fake):
    client = HathoraClient(fake.token, fake.url)
    prov = HathoraProvider(client, tmp_path / "home", "fsi-key", build_poll_s=0.01)
    s = DeploymentSpec(name="hat", provider="hathora", region="London", hf_token=TOKEN)
    first = await prov.ensure_deployment(s)
    assert await prov.ensure_deployment(s) == first  # same spec: nothing new
    s2 = s.model_copy(update={"max_model_len": 256})
    second = await prov.ensure_deployment(s2)
    assert second[1] != first[1]  # the env changed: a new deployment, on the same build
    builds = [r for r in fake.requests if r["path"] == "/builds/v3/builds/registry"]
    assert len(builds) == 1
    # a restarted control plane finds the newest deployment by its tag (no new build, no new deployment)
    await prov.aclose()
    again = HathoraProvider(HathoraClient(fake.token, fake.url), tmp_path / "home", "fsi-key", build_poll_s=0.01)
    assert await again.ensure_deployment(s2) == second
    assert len([r for r in fake.requests if r["path"] == "/builds/v3/builds/registry"]) == 1
    assert TOKEN not in (fake.deployments[second[1]]["deploymentTag"] or "")
    await again.aclose()
    assert json.loads((tmp_path / "home" / "hathora.json").read_text())["app_id"] == first[0]


@pytest.mark.parametrize("case", ["401", "404", "422", "5xx", "build"])
async def test_api_errors_surface_as_failed_deployments(tmp_path, fake, fast_backoff, case):
    kw, body, expect = {}, spec(), []
    if case == "401":
        kw["token"] = "not-the-token-" + "q" * 20
        expect = ["401", "HATHORA_TOKEN", "invalid or expired token"]
    elif case == "404":
        kw["app_id"] = "app-does-not-exist"
        expect = ["404", "app app-does-not-exist not found", "HATHORA_APP_ID"]
    elif case == "422":
        body = spec(memory_mb=16384)
        expect = ["422", "requestedMemoryMB"]
    elif case == "5xx":
        fake.failures.append({"method": "POST", "path_contains": "/deployments/v3/", "status": 500,
                              "message": "database unavailable", "times": 1000})
        expect = ["500", "database unavailable", "server error"]
    else:
        body = spec(image="ghcr.io/nobody/missing:1")
        fake.bad_images.add("ghcr.io/nobody/missing:1")
        expect = ["build", "ghcr.io/nobody/missing:1", "manifest"]
    p = platform_with(tmp_path, fake, delays=[], **kw)
    d, events = await run(p, body, lambda d: d["status"] == "failed")
    for word in expect:
        assert word in d["message"], (word, d["message"])
    failed = [e for e in events if e["reason"] == "ReplicaFailed"]
    assert len(failed) >= 3 and all(expect[0] in e["message"] for e in failed)
    assert not fake.rooms
    if case == "401":
        assert kw["token"] not in json.dumps(events) + d["message"]


async def test_429_burst_is_absorbed_by_retries(tmp_path, fake):
    delays: list[float] = []
    fake.burst_429, fake.retry_after = 4, "2"
    p = platform_with(tmp_path, fake, delays=delays)
    d, events = await run(p, spec(), lambda d: fake.rooms and d["replicas"])
    assert delays[:4] == [2.0, 2.0, 2.0, 2.0]
    assert not [e for e in events if e["reason"] == "ReplicaFailed"]


async def test_missing_token_fails_clearly(tmp_path, monkeypatch, fast_backoff):
    monkeypatch.delenv("HATHORA_TOKEN", raising=False)
    p = Platform(tmp_path / "home", "http://127.0.0.1:1", default_deployment=False, reconcile_interval_s=0.05)
    d, _ = await run(p, spec(), lambda d: d["status"] == "failed")
    assert "HATHORA_TOKEN is not set" in d["message"]


def test_cli_deploy_sends_the_hathora_fields(monkeypatch):
    from typer.testing import CliRunner

    import fleetserve.cli.platform as cli_platform
    from fleetserve.cli import app

    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        body = {**sent[-1], "hf_token_set": False}
        return httpx.Response(201, json={"name": "hat", "status": "pending", "message": "", "ready_replicas": 0,
                                         "desired_replicas": 1, "replicas": [], "endpoint": "http://x/v1",
                                         "spec": body, "created_at": time.time(), "updated_at": time.time()})

    monkeypatch.setattr(cli_platform, "_client", lambda url, key: httpx.Client(
        base_url=url, transport=httpx.MockTransport(handler)))
    r = CliRunner().invoke(app, ["deploy", "default", "-n", "hat", "--provider", "hathora", "--region", "Tokyo",
                                 "--image", "ghcr.io/me/fs:1", "--cpu", "4", "--memory-mb", "8192", "-o", "json"])
    assert r.exit_code == 0, r.output
    assert sent[0]["provider"] == "hathora" and sent[0]["region"] == "Tokyo" and sent[0]["image"] == "ghcr.io/me/fs:1"
    assert sent[0]["cpu"] == 4 and sent[0]["memory_mb"] == 8192
    DeploymentSpec.model_validate(sent[0])  # what the CLI sends is a valid spec
    r = CliRunner().invoke(app, ["deploy", "default", "-n", "loc", "-o", "json"])
    assert r.exit_code == 0 and "region" not in sent[1] and sent[1]["provider"] == "local"


async def test_a_restarted_control_plane_still_drains_the_rooms_process(tmp_path, fake):
    p = platform_with(tmp_path, fake)
    app = create_platform_app(p)
    app.state.keep_replicas = True  # the control plane "dies": its rooms keep running
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            await c.post("/api/v1/deployments", json=spec())
            deadline = time.monotonic() + 20
            while not [r for r in p.store.replicas("hat") if (r.log_path or "").startswith("hathora-process:")]:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
    (row,) = p.store.replicas("hat")
    (proc,) = fake.processes.values()
    assert row.log_path == f"hathora-process:{proc.process_id}"
    fresh = HathoraProvider(HathoraClient(fake.token, fake.url), tmp_path / "home", "k")  # a new control plane
    assert (await fresh.observe(row)).alive
    await fresh.stop(row)
    assert [q["path"] for q in fake.requests if q["path"].endswith("/stop")] == [
        f"/processes/v3/apps/{proc.app_id}/processes/{proc.process_id}/stop"]
    await fresh.aclose()


async def test_a_replica_stopped_while_its_room_is_being_created_leaves_nothing(tmp_path, fake):
    prov = HathoraProvider(HathoraClient(fake.token, fake.url), tmp_path / "home", "k", build_poll_s=0.01)
    s = DeploymentSpec(name="hat", provider="hathora", region="Dubai")
    row = await prov.start(s, "hat-abc123", 1)
    await prov.stop(row)  # scaled down before the build finished
    assert (await prov.observe(row)).alive  # still being created
    await prov._replicas[row.id].task
    (room,) = fake.rooms.values()
    assert room.status == "destroyed" and fake.processes[room.process_id].stop_requested
    assert row.id not in prov._replicas
    await prov.aclose()
