"""The Hathora client against the strict local fake of the API: every operation's path, method and body,
typed answers, and errors (401, 404, 422, 429 with Retry-After, 5xx, no network) as typed exceptions
whose messages never contain the token. No worker process starts here (no room is created)."""

from __future__ import annotations

import pytest

from fleetserve.control.providers.hathora_client import (
    DeploymentConfigV3,
    EnvVar,
    HathoraAuthError,
    HathoraClient,
    HathoraNotFound,
    HathoraRateLimited,
    HathoraServerError,
    HathoraUnavailable,
    HathoraValidationError,
)
from tests.hathora_fake import FakeHathora
from tests.net import free_port


@pytest.fixture
def fake(tmp_path):
    f = FakeHathora(tmp_path / "fake").start()
    yield f
    f.stop()


@pytest.fixture
def sleeps():
    """The client's backoff delays, recorded instead of slept (no timing in tests)."""
    return []


def recorder(delays: list[float]):
    async def sleep(s: float) -> None:
        delays.append(s)

    return sleep


@pytest.fixture
async def client(fake, sleeps):
    c = HathoraClient(fake.token, fake.url, sleep=recorder(sleeps))
    yield c
    await c.aclose()


def config(build_id: str, **kw) -> DeploymentConfigV3:
    return DeploymentConfigV3(buildId=build_id, idleTimeoutEnabled=False, env=[EnvVar(name="A", value="1")],
                              roomsPerProcess=1, transportType="tls", containerPort=8000,
                              requestedMemoryMB=kw.pop("memory", 4096), requestedCPU=2, **kw)


async def test_app_build_deployment_operations(fake, client):
    app = await client.create_app("fleetserve")
    assert (await client.get_app(app.app_id)).app_name == "fleetserve"
    assert await client.latest_deployment(app.app_id) is None  # 404 means "none yet"
    build = await client.create_registry_build(build_tag="ghcr.io/x/y:1")
    assert build.status == "created"
    log = await client.run_registry_build(build.build_id, "ghcr.io/x/y:1")
    assert "pulling ghcr.io/x/y:1" in log
    assert (await client.get_build(build.build_id)).status == "succeeded"
    dep = await client.create_deployment(app.app_id, config(build.build_id, deploymentTag="t1"))
    latest = await client.latest_deployment(app.app_id)
    assert latest.deployment_id == dep.deployment_id and latest.deployment_tag == "t1"
    assert latest.build_tag == "ghcr.io/x/y:1" and latest.env_names == ["A"]
    assert await client.latest_processes(app.app_id, status=["running"], region=["Seattle"]) == []
    by_path = {(r["method"], r["path"]) for r in fake.requests}
    assert {("POST", "/apps/v2/apps"), ("POST", "/builds/v3/builds/registry"),
            ("POST", f"/builds/v3/builds/{build.build_id}/runRegistry"),
            ("POST", f"/deployments/v3/apps/{app.app_id}/deployments"),
            ("GET", f"/deployments/v3/apps/{app.app_id}/deployments/latest")} <= by_path
    assert all(r["authorized"] for r in fake.requests)


async def test_deployment_body_has_every_required_field_with_its_type(fake, client):
    app = await client.create_app("fleetserve")
    build = await client.create_registry_build()
    await client.run_registry_build(build.build_id, "img:1")
    await client.create_deployment(app.app_id, config(build.build_id))
    import json

    body = json.loads([r for r in fake.requests if r["path"].endswith("/deployments")][-1]["body"])
    assert body == {"buildId": build.build_id, "idleTimeoutEnabled": False, "env": [{"name": "A", "value": "1"}],
                    "roomsPerProcess": 1, "transportType": "tls", "containerPort": 8000,
                    "requestedMemoryMB": 4096, "requestedCPU": 2}
    secret = config(build.build_id)
    secret.env.append(EnvVar(name="HF_TOKEN", value="hf_dont_print_me"))
    assert "hf_dont_print_me" not in repr(secret) and "HF_TOKEN" in repr(secret)


async def test_401_names_the_token_variable_but_never_contains_it(fake):
    bad = "wrong-token-" + "z" * 30
    c = HathoraClient(bad, fake.url)
    with pytest.raises(HathoraAuthError) as err:
        await c.create_app("x")
    await c.aclose()
    assert err.value.status == 401 and "HATHORA_TOKEN" in str(err.value) and bad not in str(err.value)
    assert "create app" in str(err.value) and "invalid or expired token" in str(err.value)
    assert bad not in repr(c)
    with pytest.raises(HathoraAuthError):
        HathoraClient("", fake.url)


async def test_404_and_422_are_typed_with_the_api_message(fake, client):
    with pytest.raises(HathoraNotFound) as nf:
        await client.get_app("app-nope")
    assert nf.value.status == 404 and "app app-nope not found" in str(nf.value)
    app = await client.create_app("fleetserve")
    build = await client.create_registry_build()
    await client.run_registry_build(build.build_id, "img:1")
    with pytest.raises(HathoraValidationError) as bad:
        await client.create_deployment(app.app_id, config(build.build_id, memory=16384))
    assert bad.value.status == 422 and "requestedMemoryMB" in str(bad.value)
    with pytest.raises(HathoraValidationError):  # an unknown region never reaches the API
        await client.create_room(app.app_id, "Atlantis")


async def test_429_is_retried_after_retry_after(fake, client, sleeps):
    fake.burst_429, fake.retry_after = 2, "3"
    app = await client.create_app("fleetserve")
    assert app.app_id and sleeps == [3.0, 3.0]
    assert [r["path"] for r in fake.requests] == ["/apps/v2/apps"] * 3


async def test_429_beyond_the_retries_is_rate_limited(fake, client, sleeps):
    fake.burst_429 = 100
    with pytest.raises(HathoraRateLimited) as err:
        await client.create_app("fleetserve")
    assert err.value.status == 429 and len(fake.requests) == client.max_retries + 1
    assert len(sleeps) == client.max_retries


async def test_5xx_is_retried_with_bounded_backoff(fake, client, sleeps):
    fake.failures.append({"method": "POST", "path_contains": "/apps/v2/apps", "status": 503,
                          "message": "upstream unavailable", "times": 2})
    assert (await client.create_app("fleetserve")).app_id
    assert sleeps == [0.5, 1.0]
    fake.failures.append({"method": "GET", "path_contains": "/apps/v2/apps/", "status": 500,
                          "message": "internal error", "times": 100})
    sleeps.clear()
    with pytest.raises(HathoraServerError) as err:
        await client.get_app("anything")
    assert err.value.status == 500 and "internal error" in str(err.value)
    assert len(sleeps) == client.max_retries and max(sleeps) <= client.max_backoff_s


async def test_unreachable_api_is_unavailable(sleeps):
    c = HathoraClient("tok-" + "x" * 20, f"http://127.0.0.1:{free_port()}", max_retries=1, sleep=recorder(sleeps))
    with pytest.raises(HathoraUnavailable) as err:
        await c.get_app("a")
    await c.aclose()
    assert "HATHORA_API_URL" in str(err.value) and "tok-" not in str(err.value)


async def test_connection_info_needs_no_token(fake, client):
    app = await client.create_app("fleetserve")
    with pytest.raises(HathoraNotFound):
        await client.connection_info(app.app_id, "no-room")
    assert fake.requests[-1]["authorized"] is False  # sent without the token, as Hathora serves it


async def test_room_process_logs_and_metrics_paths_for_unknown_ids(fake, client):
    app = await client.create_app("fleetserve")
    for call in (client.get_process(app.app_id, "p1"), client.stop_process(app.app_id, "p1"),
                 client.process_logs(app.app_id, "p1", 10), client.process_metrics(app.app_id, "p1"),
                 client.destroy_room(app.app_id, "r1")):
        with pytest.raises(HathoraNotFound):
            await call
    paths = [r["path"] for r in fake.requests[-5:]]
    assert paths == [f"/processes/v3/apps/{app.app_id}/processes/p1",
                     f"/processes/v3/apps/{app.app_id}/processes/p1/stop",
                     f"/logs/v1/{app.app_id}/process/p1",
                     f"/processes/v3/apps/{app.app_id}/processes/process/p1/metrics",
                     f"/rooms/v2/{app.app_id}/destroy/r1"]
    assert fake.requests[-2]["query"] == "metrics=cpu&metrics=memory"
    assert fake.requests[-3]["query"] == "tailLines=10&follow=false"


async def test_fake_enforces_the_contract(fake):
    """The fake itself is strict: wrong types, missing fields and unknown routes are rejected."""
    import httpx

    h = {"Authorization": f"Bearer {fake.token}"}
    async with httpx.AsyncClient(base_url=fake.url) as c:
        app_id = (await c.post("/apps/v2/apps", json={"appName": "a", "authConfiguration": {"anonymous": {}}},
                               headers=h)).json()["appId"]
        r = await c.post("/apps/v2/apps", json={"appName": "a"}, headers=h)
        assert r.status_code == 422 and "authConfiguration" in r.json()["message"]
        r = await c.post(f"/deployments/v3/apps/{app_id}/deployments", headers=h, json={
            "buildId": "b", "idleTimeoutEnabled": "no", "env": [], "roomsPerProcess": 1, "transportType": "tls",
            "containerPort": "8000", "requestedMemoryMB": 1024, "requestedCPU": 1})
        assert r.status_code == 422 and "idleTimeoutEnabled" in r.json()["message"]
        assert "containerPort" in r.json()["message"]
        r = await c.post(f"/rooms/v2/{app_id}/create", headers=h, json={"region": "Mars"})
        assert r.status_code == 422
        assert (await c.get("/apps/v2/apps")).status_code in (401, 404, 405)
        assert (await c.get(f"/apps/v2/apps/{app_id}")).status_code == 401  # no token
        r = await c.delete(f"/apps/v2/apps/{app_id}", headers=h)
        assert r.status_code == 405 and "message" in r.json()
