"""The Kubernetes provider's calls (official `kubernetes` client) against a small fake API server: server-side
apply with field manager `fleetserve`, object shapes (validated by the fake), status from the Deployment's
conditions and pods, readiness through the pod's URL, drain by deleting the Deployment, logs from pods;
and the same provider inside the platform, where a crash-looping pod becomes a failed deployment."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from kubernetes import client as k8s

from fleetserve.control import reconciler as reconciler_mod
from fleetserve.control.platform import Platform, create_platform_app
from fleetserve.control.providers.kubernetes import KubernetesProvider
from fleetserve.control.spec import DeploymentSpec
from tests.kubernetes_fake import FakeKubernetes

TOKEN = "hf_" + "kp" * 16


@pytest.fixture
def fake():
    f = FakeKubernetes().start()
    yield f
    f.stop()


def api_client(fake) -> k8s.ApiClient:
    cfg = k8s.Configuration(host=fake.url)
    return k8s.ApiClient(cfg)


def readyz_ok() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(
        lambda req: httpx.Response(200 if req.url.path == "/readyz" else 404, json={"status": "ready"})))


async def test_start_applies_secret_service_and_a_one_pod_deployment(fake):
    prov = KubernetesProvider(api_client(fake), internal_key="fsi-internal-0123456789")
    spec = DeploymentSpec(name="chat", provider="kubernetes", hf_token=TOKEN, cpu=1, memory_mb=2048,
                          gpu={"count": 1}, kubernetes={"namespace": "llm"})
    r = await prov.start(spec, "chat-a1b2c3", 1)
    assert r.status == "starting" and r.log_path == "llm/fleetserve-chat-a1b2c3"
    patches = [q for q in fake.requests if q["method"] == "PATCH"]
    assert [q["path"] for q in patches] == ["/api/v1/namespaces/llm/secrets/fleetserve-chat",
                                            "/api/v1/namespaces/llm/services/fleetserve-chat",
                                            "/apis/apps/v1/namespaces/llm/deployments/fleetserve-chat-a1b2c3"]
    for q in patches:
        assert q["content_type"] == "application/apply-patch+yaml"
        assert q["query"] == {"fieldManager": "fleetserve", "force": "true"}
    secret = json.loads(patches[0]["body"])
    assert secret["stringData"] == {"HF_TOKEN": TOKEN, "FLEETSERVE_API_KEY": "fsi-internal-0123456789"}
    dep = fake.objects[("deployments", "llm", "fleetserve-chat-a1b2c3")]
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["template"]["metadata"]["labels"]["fleetserve.dev/replica"] == "chat-a1b2c3"
    assert TOKEN not in json.dumps(dep)  # the Deployment refers to the Secret, never holds the token
    assert (await prov.observe(r)).alive
    async with readyz_ok() as http:
        assert await prov.ready(r, http)
    assert r.url == "http://127.0.0.1:8000"
    assert await prov.logs(r, 2) == ["loading model", "ready"]
    log_call = [q for q in fake.requests if q["path"].endswith("/log")][-1]
    assert log_call["query"] == {"container": "fleetserve", "tailLines": "2"}

    # drain: delete the Deployment; alive while its pod terminates, gone after
    await prov.stop(r)
    assert ("deployments", "llm", "fleetserve-chat-a1b2c3") not in fake.objects
    assert (await prov.observe(r)).alive
    fake.finish_terminations()
    gone = await prov.observe(r)
    assert not gone.alive and "is gone" in gone.reason
    await prov.stop(r, force=True)  # idempotent
    await prov.aclose()


async def test_status_from_conditions_and_pods(fake):
    prov = KubernetesProvider(api_client(fake))
    spec = DeploymentSpec(name="bad", provider="kubernetes", image="ghcr.io/me/broken:1")
    fake.pod_state = "crashloop"
    r = await prov.start(spec, "bad-000001", 1)
    live = await prov.observe(r)
    assert not live.alive and "CrashLoopBackOff" in live.reason and live.exit_code == 1
    async with readyz_ok() as http:
        assert not await prov.ready(r, http)
    fake.pod_state = "pending"
    r2 = await prov.start(spec, "bad-000002", 1)
    assert (await prov.observe(r2)).alive
    async with readyz_ok() as http:
        assert not await prov.ready(r2, http)  # not Ready, no pod IP yet
    dep = fake.objects[("deployments", "default", "fleetserve-bad-000002")]
    dep["status"]["conditions"] = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                    "message": 'ReplicaSet "x" has timed out progressing.'}]
    live = await prov.observe(r2)
    assert not live.alive and live.reason.startswith("ProgressDeadlineExceeded")
    await prov.stop(r2, force=True)
    assert not [p for p in fake.pods.values() if p["metadata"]["labels"].get("fleetserve.dev/replica") == r2.id]
    await prov.aclose()


async def test_autoscaler_objects_are_for_dry_run_only(fake):
    prov = KubernetesProvider(api_client(fake))
    with pytest.raises(ValueError, match="--dry-run"):
        await prov.start(DeploymentSpec(name="a", provider="kubernetes", kubernetes={"autoscaler": "keda"}), "a-1", 1)
    assert not fake.requests
    await prov.aclose()


async def test_platform_surfaces_a_crash_looping_pod_as_failed(tmp_path, fake, monkeypatch):
    monkeypatch.setattr(reconciler_mod, "BACKOFF_BASE_S", 0.01)
    fake.pod_state = "crashloop"
    p = Platform(tmp_path / "home", "http://127.0.0.1:1", default_deployment=False, reconcile_interval_s=0.05,
                 providers={"kubernetes": lambda: KubernetesProvider(api_client(fake))})
    app = create_platform_app(p)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/api/v1/deployments", json={"name": "k", "provider": "kubernetes", "hf_token": TOKEN})
            assert r.status_code == 201, r.text
            deadline = time.monotonic() + 20
            while (d := (await c.get("/api/v1/deployments/k")).json())["status"] != "failed":
                assert time.monotonic() < deadline, d
                await asyncio.sleep(0.05)
            assert "CrashLoopBackOff" in d["message"]
            events = (await c.get("/api/v1/deployments/k/events")).json()["events"]
            assert len([e for e in events if e["reason"] == "ReplicaFailed"]) >= 3
            assert TOKEN not in json.dumps(events) + json.dumps(d)
    # every failed replica's Deployment was deleted again
    assert not [k for k in fake.objects if k[0] == "deployments"]


async def test_missing_cluster_config_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr(reconciler_mod, "BACKOFF_BASE_S", 0.01)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    p = Platform(tmp_path / "home", "http://127.0.0.1:1", default_deployment=False, reconcile_interval_s=0.05)
    app = create_platform_app(p)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            await c.post("/api/v1/deployments", json={"name": "k", "provider": "kubernetes"})
            deadline = time.monotonic() + 20
            while (d := (await c.get("/api/v1/deployments/k")).json())["status"] != "failed":
                assert time.monotonic() < deadline, d
                await asyncio.sleep(0.05)
            assert "no Kubernetes cluster configured" in d["message"]
