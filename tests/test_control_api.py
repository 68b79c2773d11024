"""The control API's contract (validation, conflicts, secrets, patch, delete) and the gateway's routing
policy, in-process. Deployments here have min 0 replicas, so no worker process starts."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from fleetserve.control.platform import Platform, create_platform_app
from fleetserve.gateway.router import ReplicaSet

TOKEN = "hf_" + "s3cr3t" * 6


@pytest.fixture
async def api(tmp_path):
    p = Platform(tmp_path / "home", "http://127.0.0.1:1", default_deployment=False, reconcile_interval_s=0.05)
    app = create_platform_app(p)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            yield c, p


def spec(**kw):
    return {"name": "alpha", "model": "default", "replicas": {"min": 0, "max": 1}, **kw}


async def test_create_get_list_and_secret_never_returned(api):
    c, p = api
    r = await c.post("/api/v1/deployments", json=spec(hf_token=TOKEN))
    assert r.status_code == 201
    d = r.json()
    assert d["name"] == "alpha" and d["endpoint"] == "http://127.0.0.1:1/v1"
    assert d["spec"]["hf_token_set"] is True and "hf_token" not in d["spec"]
    assert {"status", "message", "ready_replicas", "replicas", "created_at", "updated_at"} <= set(d)
    for path in ("/api/v1/deployments", "/api/v1/deployments/alpha", "/api/v1/deployments/alpha/events"):
        assert TOKEN not in (await c.get(path)).text
    assert TOKEN.encode() not in (p.home / "fleetserve.db").read_bytes()
    assert p.store.get("alpha").spec.hf_token.get_secret_value() == TOKEN  # kept, encrypted, for the replicas
    assert [x["name"] for x in (await c.get("/api/v1/deployments")).json()] == ["alpha"]


@pytest.mark.parametrize("body,field", [
    ({"name": "Bad_Name"}, "name"),
    ({"name": "-x"}, "name"),
    ({"name": "a" * 64}, "name"),
    ({"name": "ok", "replicas": {"min": 3, "max": 2}}, "replicas"),
    ({"name": "ok", "precision": "int3"}, "precision"),
    ({"name": "ok", "backend": "tgi"}, "backend"),
    ({"name": "ok", "backend": "sglang"}, "backend"),  # the embedded GGUF model is the native engine's
    ({"name": "ok", "model": "org/m", "backend": "sglang", "provider": "hathora", "region": "Seattle"}, "provider"),
    ({"name": "ok", "model": "org/m", "backend": "vllm", "replicas": {"min": 1, "max": 2}}, "replicas"),
    ({"name": "ok", "model": "org/m", "backend": "sglang", "device": "cpu"}, "device"),
    ({"name": "ok", "model": "org/m", "backend": "sglang", "engine_args": {"max_batch_tokens": 64}}, "engine_args"),
    ({"name": "ok", "provider": "nomad"}, "provider"),
    ({"name": "ok", "provider": "hathora"}, "region"),  # region required there
    ({"name": "ok", "region": "Seattle"}, "region"),  # local provider: no region
    ({"name": "ok", "tp_size": 2}, "tp_size"),
    ({"name": "ok", "engine_args": {"max_batch_tokens": -1}}, "engine_args"),
    ({"name": "ok", "engine_args": {"foo": 1}}, "engine_args"),
    ({"name": "ok", "engine_args": {"quantization": "awq"}}, "engine_args"),
    ({"name": "ok", "engine_args": {"speculative": "eagle"}}, "engine_args"),  # needs a draft model path
    ({"name": "ok", "engine_args": {"tp_size": True}}, "engine_args"),
    ({"name": "ok", "model": "org/m", "backend": "vllm", "engine_args": {"speculative": "ngram"}}, "engine_args"),
    ({"name": "ok", "autoscale": {"target_concurrency": 0}}, "autoscale"),
])
async def test_invalid_specs_are_422_naming_the_field(api, body, field):
    c, _ = api
    r = await c.post("/api/v1/deployments", json=body)
    assert r.status_code == 422, r.text
    assert field in [str(x) for x in r.json()["detail"][0]["loc"]]


async def test_duplicate_is_409_and_unknown_is_404(api):
    c, _ = api
    assert (await c.post("/api/v1/deployments", json=spec())).status_code == 201
    assert (await c.post("/api/v1/deployments", json=spec())).status_code == 409
    for method, path in (("GET", "/api/v1/deployments/nope"), ("DELETE", "/api/v1/deployments/nope"),
                         ("GET", "/api/v1/deployments/nope/logs"), ("GET", "/api/v1/deployments/nope/metrics"),
                         ("PATCH", "/api/v1/deployments/nope")):
        r = await c.request(method, path, json={} if method == "PATCH" else None)
        assert r.status_code == 404, (method, path)


async def test_min_zero_deployment_is_scaled_to_zero_then_patch_and_delete(api):
    c, p = api
    await c.post("/api/v1/deployments", json=spec())
    deadline = time.time() + 5
    while (await c.get("/api/v1/deployments/alpha")).json()["status"] != "scaled_to_zero":
        assert time.time() < deadline
        await p.reconciler.reconcile_all()
    r = await c.patch("/api/v1/deployments/alpha", json={"replicas": {"max": 3}, "autoscale": {"window_s": 10}})
    assert r.status_code == 200 and r.json()["spec"]["replicas"] == {"min": 0, "max": 3}
    assert r.json()["spec"]["autoscale"]["window_s"] == 10
    bad = await c.patch("/api/v1/deployments/alpha", json={"replicas": {"min": 5}})
    assert bad.status_code == 422
    assert (await c.patch("/api/v1/deployments/alpha", json={"image": "x"})).status_code == 422
    reasons = [e["reason"] for e in (await c.get("/api/v1/deployments/alpha/events")).json()["events"]]
    assert reasons[0] == "Created" and "Updated" in reasons
    assert (await c.delete("/api/v1/deployments/alpha")).status_code == 202
    deadline = time.time() + 5
    while (await c.get("/api/v1/deployments/alpha")).status_code != 404:
        assert time.time() < deadline
        await p.reconciler.reconcile_all()


async def test_gateway_answers_openai_errors_for_unknown_models_and_bad_json(api):
    c, _ = api
    r = await c.post("/v1/chat/completions", json={"model": "ghost", "messages": []})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = await c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert (await c.get("/v1/models")).json()["data"] == []


async def test_admin_key_required_everywhere_but_health(tmp_path):
    p = Platform(tmp_path / "home", "http://x", api_keys=["adm1n-key"], default_deployment=False)
    app = create_platform_app(p)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert (await c.get("/healthz")).status_code == 200
            assert (await c.get("/api/v1/deployments")).status_code == 401
            r = await c.post("/v1/chat/completions", json={})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            ok = await c.get("/api/v1/deployments", headers={"Authorization": "Bearer adm1n-key"})
            assert ok.status_code == 200
            assert (await c.get("/api/v1/deployments", headers={"Authorization": "Bearer wrong"})).status_code == 401


def test_routing_prefers_affinity_until_load_is_unbalanced():
    rs = ReplicaSet(urls=["http://a", "http://b", "http://c"])
    key = "system prompt shared by a conversation"
    first = rs.pick(key, set())
    assert all(rs.pick(key, set()) == first for _ in range(5))  # same prefix, same replica
    spread = {rs.pick(f"prompt {i}", set()) for i in range(40)}
    assert spread == set(rs.urls)  # different prefixes spread over every replica
    rs.in_flight = {first: 5}
    assert rs.pick(key, set()) != first  # too busy: least outstanding wins
    assert rs.pick(None, {"http://a", "http://b"}) == "http://c"
    rs.ejected_until = {"http://a": time.monotonic() + 60}
    assert "http://a" not in {rs.pick(f"p{i}", set()) for i in range(30)}


async def test_model_that_fails_to_load_shows_failed_with_reason_and_backs_off(api, tmp_path):
    """Real replica processes that exit at once: `failed` with the worker's own error, retries spaced out."""
    c, p = api
    missing = tmp_path / "no-such-model.gguf"
    r = await c.post("/api/v1/deployments", json={"name": "broken", "model": str(missing)})
    assert r.status_code == 201
    deadline = time.time() + 120
    while True:
        d = (await c.get("/api/v1/deployments/broken")).json()
        if d["status"] == "failed":
            break
        assert time.time() < deadline, d
        await asyncio.sleep(0.5)
    assert "no-such-model.gguf" in d["message"] and "failed starts" in d["message"]
    events = (await c.get("/api/v1/deployments/broken/events")).json()["events"]
    failures = [e for e in events if e["reason"] == "ReplicaFailed"]
    assert len(failures) >= 3
    gaps = [b["ts"] - a["ts"] for a, b in zip(failures, failures[1:])]
    assert gaps[1] >= gaps[0] and gaps[1] >= 3.5  # exponential backoff (2 s, 4 s, ...), no restart storm
    assert (await c.delete("/api/v1/deployments/broken")).status_code == 202


async def test_gpu_backend_replicas_run_fleetserve_serve_with_the_backend(api):
    c, p = api
    r = await c.post("/api/v1/deployments", json=spec(name="gpu", model="org/m", backend="vllm",
                                                       engine_args={"kv_cache_tokens": 65536}))
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["backend"] == "vllm"
    bad = await c.patch("/api/v1/deployments/gpu", json={"replicas": {"max": 2}})
    assert bad.status_code == 422 and "one replica per machine" in bad.text
    from fleetserve.control.providers.local import LocalProvider

    argv = LocalProvider(p.home).command(p.store.get("gpu").spec, 9999)
    assert argv[argv.index("--backend") + 1] == "vllm" and "--kv-cache-tokens" in argv
    assert 1 <= int(argv[argv.index("--engine-port") + 1]) <= 65000


async def test_gpu_backend_without_gpus_fails_with_the_planners_message(api):
    """A real replica (`fleetserve serve --backend sglang`) on a machine without GPUs exits 2 at once with the
    planner's reason, which the reconciler shows once the starts have failed three times."""
    from fleetserve.planner.hardware import detect_hardware

    if detect_hardware().count:
        pytest.skip("this machine has NVIDIA GPUs")
    c, _ = api
    r = await c.post("/api/v1/deployments", json={"name": "gpu", "model": "Qwen/Qwen2.5-7B-Instruct",
                                                  "backend": "sglang"})
    assert r.status_code == 201, r.text
    deadline = time.time() + 120
    while True:
        d = (await c.get("/api/v1/deployments/gpu")).json()
        if d["status"] == "failed":
            break
        assert time.time() < deadline, d
        await asyncio.sleep(0.5)
    assert "failed starts" in d["message"]
    assert "the sglang backend needs NVIDIA GPUs and this machine has no GPU (CPU only)" in d["message"]
    events = (await c.get("/api/v1/deployments/gpu/events")).json()["events"]
    assert any(e["reason"] == "ReplicaFailed" and "needs NVIDIA GPUs" in e["message"] for e in events)
    assert (await c.delete("/api/v1/deployments/gpu")).status_code == 202


def test_deploy_cli_passes_the_backend(monkeypatch):
    from typer.testing import CliRunner

    import fleetserve.cli.platform as platform_cli
    from fleetserve.cli import app

    sent = []
    monkeypatch.setattr(platform_cli, "_call", lambda method, url, key, path, json=None: sent.append(json) or {})
    monkeypatch.setattr(platform_cli, "_emit", lambda *a, **k: None)
    result = CliRunner().invoke(app, ["deploy", "Qwen/Qwen2.5-7B-Instruct", "--name", "qwen", "--backend", "sglang"])
    assert result.exit_code == 0, result.output
    assert sent[0]["backend"] == "sglang" and sent[0]["replicas"] == {"min": 1, "max": 1}
    CliRunner().invoke(app, ["deploy", "default", "--name", "chat"])
    assert "backend" not in sent[1]  # the API's default (native)


async def test_native_engine_args_reach_the_replica_as_serve_options(api):
    """Speed options chosen for a deployment (console or API) become `fleetserve serve` flags that the
    worker's own CLI accepts (checked with its --dry-run, which validates without starting)."""
    from typer.testing import CliRunner

    from fleetserve.cli import app
    from fleetserve.control.providers.local import LocalProvider
    from tests.net import free_port

    c, p = api
    args = {"quantization": "fp8", "kv_cache_dtype": "fp8_e4m3", "speculative": "ngram", "speculative_num_steps": 3,
            "attention_backend": "torch", "max_batch_tokens": 512}
    r = await c.post("/api/v1/deployments", json=spec(name="fast", engine_args=args))
    assert r.status_code == 201, r.text
    argv = LocalProvider(p.home).command(p.store.get("fast").spec, free_port())
    for flag, value in (("--quantization", "fp8"), ("--kv-cache-dtype", "fp8_e4m3"), ("--speculative", "ngram"),
                        ("--speculative-num-steps", "3"), ("--attention-backend", "torch")):
        assert argv[argv.index(flag) + 1] == value
    result = CliRunner().invoke(app, [*argv[argv.index("serve"):], "--dry-run"], env={"NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert "config valid" in result.output
