"""Security properties, checked by behaviour (not by reading the code):

- planted secrets (an HF token in a deployment spec, the platform's admin key) appear nowhere: no API
  response (error echoes included), no file under FLEETSERVE_HOME (the SQLite file and its WAL included),
  no log, no process command line; the HF token reaches the replica only through its environment, and
  the replica never sees the admin key (it gets the platform's internal key instead);
- bearer keys: a wrong key of every length, and near-misses of the right one, get 401; the right key 200;
- loopback by default: `fleetserve serve` and `fleetserve up` bind 127.0.0.1 unless told otherwise;
- CORS closed by default: a cross-origin request gets no `access-control-allow-origin`;
- the state files holding keys are private (0600).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import stat
import string
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
from typer.testing import CliRunner

from fleetserve.cli import app as cli_app
from fleetserve.config import ServeConfig
from fleetserve.control.platform import Platform, create_platform_app
from tests.net import wait_for
from tests.reference import write_tiny_checkpoint
from tests.worker_apps import client, make_app

ALNUM = string.ascii_letters + string.digits
RNG = random.Random(20240611)


def planted_hf_token() -> str:
    return "hf_" + "".join(RNG.choice(ALNUM) for _ in range(34))


def planted_key(prefix: str = "fsk-") -> str:
    return prefix + "".join(RNG.choice(ALNUM) for _ in range(32))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- keys: behaviour, not code inspection -----------------------------------------------------------------


def wrong_keys(key: str) -> list[str]:
    """Random keys of every length from 0 to twice the right one's, and near-misses of the right one. (Whitespace
    around a header value is not part of it in HTTP, so `key + "\\t"` is the right key, not a near-miss.)"""
    out = []
    for n in range(0, 2 * len(key) + 2):
        candidate = "".join(RNG.choice(ALNUM + "-_") for _ in range(n))
        if candidate != key:
            out.append(candidate)
    out += [key[:-1], key[1:], key + "x", "x" + key, key[:-1] + chr(ord(key[-1]) ^ 1), chr(ord(key[0]) ^ 1) + key[1:],
            key.swapcase(), key + key, key[: len(key) // 2], key.upper(), key.lower(), "a" * 4096,
            key.replace(key[len(key) // 2], "\u00e9"), key + "\u00e9"]
    return [k for k in out if k != key]


def _status(response) -> int:
    return response.status_code


async def test_worker_keys_every_wrong_length_401_right_key_200():
    key, other = planted_key(), planted_key("k2-")
    app, _ = make_app(None, None, api_keys=[key, other])
    async with client(app) as c:
        for right in (key, other):
            for path in ("/v1/models", "/logs"):
                r = await c.get(path, headers={"Authorization": f"Bearer {right}"})
                assert r.status_code in (200, 404), (path, r.text)  # /logs: 404 = no log file, but let in
            assert (await c.get("/v1/models", headers={"Authorization": f"bearer {right}"})).status_code == 200
        for wrong in wrong_keys(key) + [other[: len(other) // 2] + key[len(key) // 2:]]:
            header = f"Bearer {wrong}".encode("latin-1", "replace")
            for path in ("/v1/models", "/logs"):
                r = await c.get(path, headers={"Authorization": header})
                assert r.status_code == 401, (path, wrong, r.status_code)
                assert wrong not in r.text or not wrong  # never echoed
            r = await c.get("/v1/models", headers={"Authorization": header})
            assert r.json()["error"]["type"] == "authentication_error"
        for header in ({}, {"Authorization": f"Basic {key}"}, {"Authorization": key}, {"Authorization": "Bearer"},
                       {"X-API-Key": key}):
            assert (await c.get("/v1/models", headers=header)).status_code == 401, header
        # health and readiness stay open
        assert (await c.get("/healthz")).status_code == 200


async def test_platform_admin_key_every_wrong_length_401_right_key_200(tmp_path):
    key = planted_key("adm-")
    p = Platform(tmp_path / "home", "http://127.0.0.1:1", api_keys=[key], default_deployment=False)
    app = create_platform_app(p)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert (await c.get("/api/v1/deployments", headers={"Authorization": f"Bearer {key}"})).status_code == 200
            for wrong in wrong_keys(key):
                header = {"Authorization": f"Bearer {wrong}".encode("latin-1", "replace")}
                assert (await c.get("/api/v1/deployments", headers=header)).status_code == 401, wrong
                r = await c.post("/v1/chat/completions", json={"model": "x"}, headers=header)
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", wrong
            assert (await c.get("/api/v1/deployments")).status_code == 401
            assert (await c.get("/healthz")).status_code == 200


# ---- loopback and CORS by default --------------------------------------------------------------------------


def test_default_bind_is_loopback():
    """`fleetserve serve --print-config` shows host 127.0.0.1 from the defaults; `fleetserve up` defaults to it
    too (the slow test below checks what the real processes listen on)."""
    env = {k: None for k in os.environ if k.startswith(("FLEETSERVE_", "HATHORA_"))}
    env |= {"HOST": None, "PORT": None, "DEPLOYMENT_CONFIG_JSON": None, "COLUMNS": "250"}
    result = CliRunner().invoke(cli_app, ["serve", "--print-config"], env=env)
    assert result.exit_code == 0, result.output
    host_rows = [line for line in result.output.splitlines() if line.strip().strip("│┃").strip().startswith("host")]
    assert host_rows and "127.0.0.1" in host_rows[0] and "default" in host_rows[0], host_rows
    assert ServeConfig().host == "127.0.0.1"
    result = CliRunner().invoke(cli_app, ["up", "--help"], env=env)
    assert result.exit_code == 0 and "127.0.0.1" in result.output


async def test_cors_is_closed_by_default(tmp_path):
    """No CORS header for a cross-origin request or preflight, on a worker and on the platform."""
    origin = {"Origin": "https://evil.example"}
    preflight = {**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    app, _ = make_app(None, None)
    async with client(app) as c:
        for r in (await c.get("/v1/models", headers=origin), await c.get("/health", headers=origin),
                  await c.options("/v1/chat/completions", headers=preflight)):
            assert not any(h.lower().startswith("access-control-") for h in r.headers), dict(r.headers)
    p = Platform(tmp_path / "home", "http://127.0.0.1:1", default_deployment=False)
    papp = create_platform_app(p)
    async with papp.router.lifespan_context(papp):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=papp), base_url="http://t") as c:
            for r in (await c.get("/api/v1/deployments", headers=origin), await c.get("/", headers=origin),
                      await c.options("/api/v1/deployments", headers=preflight),
                      await c.options("/v1/chat/completions", headers=preflight)):
                assert not any(h.lower().startswith("access-control-") for h in r.headers), dict(r.headers)


def test_platform_key_files_are_private(tmp_path):
    p = Platform(tmp_path / "home", "http://127.0.0.1:1", default_deployment=False)
    for name in ("secret.key", "internal.key"):
        mode = stat.S_IMODE((p.home / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    assert b"fsi-" not in (p.home / "internal.key").read_bytes()  # the internal key is stored sealed


# ---- planted secrets, the whole platform with a real replica -------------------------------------------------


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLEETSERVE_", "HATHORA_")) and k not in {
               "PORT", "HOST", "MODEL_PATH", "MAX_TOTAL_TOKENS", "LOG_LEVEL", "DEPLOYMENT_CONFIG_JSON", "HF_TOKEN"}}
    return {**env, "FLEETSERVE_HOME": str(home), "HF_HUB_OFFLINE": "1"}


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc/<pid>/environ")
def test_planted_secrets_are_found_nowhere(tmp_path, tokenizer):
    """`fleetserve up` (admin key in its environment) with one real replica of a tiny model whose spec carries an
    HF token. Afterwards neither secret is in any API response (including errors that echo the request), any
    file under FLEETSERVE_HOME, the platform's or the replica's output, or any command line. The token is in
    the replica's environment (its only channel); the admin key is not (the replica gets the internal key),
    and the replica refuses the admin key. Both processes listen on 127.0.0.1 only."""
    hf_token, admin = planted_hf_token(), planted_key("adm-")
    secrets = {"hf token": hf_token, "admin key": admin}
    model = write_tiny_checkpoint(tmp_path / "tiny", "llama", tokenizer, max_position_embeddings=256)
    home = tmp_path / "home"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out = tmp_path / "up.out"
    env = {**_clean_env(home), "FLEETSERVE_API_KEY": admin}
    up = subprocess.Popen([sys.executable, "-m", "fleetserve", "up", "--port", str(port), "--no-default-deployment"],
                          env=env, stdout=out.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    auth = {"Authorization": f"Bearer {admin}"}
    responses: list[tuple[str, str]] = []
    pids: list[int] = []

    def call(method: str, path: str, **kw) -> httpx.Response:
        r = httpx.request(method, f"{base}{path}", timeout=60, **kw)
        responses.append((f"{method} {path} -> {r.status_code}", r.text + "\n" + str(r.headers)))
        return r

    try:
        wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200, 60, "the platform", up, out)
        spec = {"name": "sec", "model": str(model), "hf_token": hf_token, "replicas": {"min": 1, "max": 1},
                "engine_args": {"kv_cache_tokens": 4096}}
        assert call("POST", "/api/v1/deployments", json=spec).status_code == 401  # no key
        assert call("POST", "/api/v1/deployments", json=spec, headers=auth).status_code == 201
        # requests that fail and would echo what they were sent
        assert call("POST", "/api/v1/deployments", json=spec, headers=auth).status_code == 409
        assert call("POST", "/api/v1/deployments", json={"hf_token": hf_token}, headers=auth).status_code == 422
        assert call("POST", "/api/v1/deployments", json={**spec, "name": "x2", "hf_token": [hf_token]},
                    headers=auth).status_code == 422
        assert call("PATCH", "/api/v1/deployments/sec", json={"hf_token": hf_token}, headers=auth).status_code == 422
        assert call("GET", "/api/v1/deployments", headers={"Authorization": f"Bearer {hf_token}"}).status_code == 401
        d = wait_for(lambda: (x := httpx.get(f"{base}/api/v1/deployments/sec", headers=auth).json())["status"]
                  == "running" and x, 180, "the replica", up, out)
        replica = d["replicas"][0]
        pids = [up.pid, replica["pid"]]
        r = call("POST", "/v1/completions", json={"model": "sec", "prompt": "hello", "max_tokens": 3}, headers=auth)
        assert r.status_code == 200
        for path in ("/api/v1/deployments", "/api/v1/deployments/sec", "/api/v1/deployments/sec/events",
                     "/api/v1/deployments/sec/logs?tail=1000", "/api/v1/deployments/sec/metrics", "/v1/models",
                     "/deployments/sec/health", "/deployments/sec/logs?tail=1000", "/deployments/sec/metrics",
                     "/openapi.json", "/docs", "/"):
            assert call("GET", path, headers=auth).status_code == 200, path

        # the replica trusts the gateway's internal key only: the admin key (or none) gets nowhere
        rep_url = replica["url"]
        assert httpx.get(f"{rep_url}/v1/models").status_code == 401
        assert httpx.get(f"{rep_url}/v1/models", headers=auth).status_code == 401
        assert httpx.get(f"{rep_url}/health").status_code == 200
        rep_env = _environ(replica["pid"])
        assert rep_env.get("HF_TOKEN") == hf_token  # the one channel the token travels by
        assert admin not in "\0".join(f"{k}={v}" for k, v in rep_env.items())
        assert rep_env.get("FLEETSERVE_API_KEY", "").startswith("fsi-")

        # listening sockets: loopback only
        for pid in pids:
            listening = [c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet")
                         if c.status == psutil.CONN_LISTEN]
            assert listening and set(listening) == {"127.0.0.1"}, (pid, listening)

        # command lines of the platform and the replica
        for pid in pids:
            cmdline = " ".join(psutil.Process(pid).cmdline())
            for what, secret in secrets.items():
                assert secret not in cmdline, f"{what} on the command line of {pid}: {cmdline}"
    finally:
        up.send_signal(signal.SIGTERM)  # stops the replica too (drain, then exit)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        for pid in pids[1:]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # API responses
    for label, text in responses:
        for what, secret in secrets.items():
            assert secret not in text, f"{what} in the response to {label}: {text[:500]}"
    # every file under FLEETSERVE_HOME (database, WAL, keys, replica logs) and the platform's own output
    files = [f for f in home.rglob("*") if f.is_file()] + [out]
    assert any(f.name == "fleetserve.db" for f in files) and any(f.suffix in (".log", ".jsonl") for f in files)
    for f in files:
        data = f.read_bytes()
        for what, secret in secrets.items():
            assert secret.encode() not in data, f"{what} in plaintext in {f}"
