"""API keys, CORS and the body size limit on the real worker app, plus their config and CLI plumbing."""

from __future__ import annotations

import json
import logging

import pytest
from typer.testing import CliRunner

from fleetserve.cli import app as cli_app
from fleetserve.config import DEFAULT_MAX_BODY_BYTES, ConfigError, ServeConfig, config_as_dict, load_serve_config
from tests.worker_apps import STORY, client, file_logging, make_app, value

KEY = "fs-key-Zq8wP1c7TtY3"
KEY2 = "fs-key-second-9x8y7z"
WRONG = "fs-key-WRONG-0000000"
ORIGIN = "https://console.example.com"
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_auth_error(r, code: str) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    err = r.json()["error"]
    assert err["type"] == "authentication_error" and err["code"] == code and err["param"] is None
    assert "Authorization: Bearer" in err["message"] or "not one of this server's keys" in err["message"]


# ---- API keys ----------------------------------------------------------------------------------


async def test_without_keys_nothing_requires_one(default_engine, tokenizer, tmp_path):
    app, _ = make_app(default_engine, tokenizer, log_file=tmp_path / "w.log")
    async with client(app) as c:
        assert (await c.get("/v1/models")).status_code == 200
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert (await c.get("/logs")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200
        # A bearer token that is not needed is not checked either.
        assert (await c.get("/v1/models", headers=bearer(WRONG))).status_code == 200


async def test_keys_guard_v1_and_logs_but_not_health(default_engine, tokenizer, tmp_path):
    app, _ = make_app(default_engine, tokenizer, log_file=tmp_path / "w.log", api_keys=[KEY, KEY2])
    async with client(app) as c:
        assert_auth_error(await c.post("/v1/chat/completions", json=CHAT), "missing_api_key")
        assert_auth_error(await c.get("/v1/models"), "missing_api_key")
        r = await c.post("/v1/completions", json={"prompt": STORY}, headers=bearer(WRONG))
        assert_auth_error(r, "invalid_api_key")
        assert WRONG not in r.text and KEY not in r.text
        for header in ({"Authorization": f"Basic {KEY}"}, {"Authorization": KEY}, {"Authorization": "Bearer "},
                       {"X-API-Key": KEY}):
            assert_auth_error(await c.get("/v1/models", headers=header), "missing_api_key")
        assert_auth_error(await c.get("/v1/models", headers=bearer(KEY + "x")), "invalid_api_key")
        # Either configured key works.
        assert (await c.post("/v1/chat/completions", json=CHAT, headers=bearer(KEY))).status_code == 200
        assert (await c.get("/v1/models", headers=bearer(KEY2))).status_code == 200
        assert (await c.get("/v1/models", headers={"Authorization": f"bearer {KEY2}"})).status_code == 200
        # /logs: the same check, FastAPI's error shape (it is not an OpenAI route).
        r = await c.get("/logs")
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["detail"]
        assert (await c.get("/logs", headers=bearer(WRONG))).status_code == 401
        assert (await c.get("/logs", headers=bearer(KEY))).status_code == 200
        # Health, readiness and (by default) metrics stay open.
        for path in ("/health", "/healthz", "/readyz", "/metrics"):
            assert (await c.get(path)).status_code == 200, path


async def test_metrics_auth_closes_metrics(default_engine, tokenizer):
    app, _ = make_app(default_engine, tokenizer, api_keys=[KEY], metrics_auth=True)
    async with client(app) as c:
        r = await c.get("/metrics")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "detail" in r.json()
        assert (await c.get("/metrics", headers=bearer(WRONG))).status_code == 401
        r = await c.get("/metrics", headers=bearer(KEY))
        assert r.status_code == 200 and "fleetserve_requests_total" in r.text
        assert (await c.get("/healthz")).status_code == 200
    # metrics_auth without any key: nothing to check against, so it stays open (and a warning says so).
    app, _ = make_app(default_engine, tokenizer, metrics_auth=True)
    async with client(app) as c:
        assert (await c.get("/metrics")).status_code == 200


async def test_keys_never_reach_the_logs(default_engine, tokenizer, tmp_path):
    log_file = tmp_path / "worker.log"
    app, _ = make_app(default_engine, tokenizer, log_file=log_file, api_keys=[KEY])  # registers KEY for redaction
    with file_logging(log_file, level="debug"):
        async with client(app) as c:
            await c.post("/v1/chat/completions", json=CHAT, headers=bearer(KEY))
            await c.post("/v1/chat/completions", json=CHAT, headers=bearer(WRONG))
            await c.get("/v1/models", headers={"Authorization": f"Basic {KEY}"})
            await c.get("/logs", params={"tail": 3}, headers=bearer(KEY))
            await c.get(f"/v1/{KEY}")  # a key in the path: the access log line must not show it
            logging.getLogger("fleetserve.test").warning("someone pasted %s and %r", KEY, {"auth": f"Bearer {WRONG}"})
    text = log_file.read_text()
    assert len(text.splitlines()) >= 6
    assert KEY not in text and WRONG not in text and "Bearer ***" in text
    statuses = [json.loads(line).get("status") for line in text.splitlines()]
    assert statuses.count(401) == 2 and statuses.count(200) >= 2


# ---- CORS --------------------------------------------------------------------------------------


def preflight(origin: str) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"}


async def test_cors_is_closed_by_default(default_engine, tokenizer):
    app, _ = make_app(default_engine, tokenizer)
    async with client(app) as c:
        r = await c.options("/v1/chat/completions", headers=preflight(ORIGIN))
        assert r.status_code >= 400 and "access-control-allow-origin" not in r.headers
        r = await c.get("/v1/models", headers={"Origin": ORIGIN})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


async def test_cors_allows_only_configured_origins(default_engine, tokenizer):
    app, _ = make_app(default_engine, tokenizer, cors_origins=[ORIGIN], api_keys=[KEY])
    async with client(app) as c:
        r = await c.options("/v1/chat/completions", headers=preflight(ORIGIN))  # no key needed for a preflight
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == ORIGIN
        allowed = r.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "content-type" in allowed
        assert "POST" in r.headers["access-control-allow-methods"]
        r = await c.options("/v1/chat/completions", headers=preflight("https://evil.example.net"))
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = await c.post("/v1/chat/completions", json=CHAT, headers={"Origin": ORIGIN, **bearer(KEY)})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        # Errors are readable cross-origin too (the browser can show why).
        r = await c.post("/v1/chat/completions", json=CHAT, headers={"Origin": ORIGIN})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
        r = await c.get("/v1/models", headers={"Origin": "https://evil.example.net", **bearer(KEY)})
        assert "access-control-allow-origin" not in r.headers


async def test_cors_wildcard(default_engine, tokenizer):
    app, _ = make_app(default_engine, tokenizer, cors_origins=["*"])
    async with client(app) as c:
        r = await c.options("/v1/completions", headers=preflight("http://localhost:5173"))
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", "http://localhost:5173")


# ---- body size limit ---------------------------------------------------------------------------


async def test_oversized_body_by_content_length_is_413(default_engine, tokenizer):
    app, _ = make_app(default_engine, tokenizer, max_body_bytes=1024)
    async with client(app) as c:
        body = json.dumps({"prompt": "x" * 2000, "max_tokens": 1}).encode()
        r = await c.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["code"] == "request_too_large"
        assert f"{len(body)} bytes" in err["message"] and "at most 1024 bytes" in err["message"]
        assert r.headers["x-request-id"]
        # Outside /v1: FastAPI's shape.
        r = await c.post("/metrics", content=b"x" * 5000)
        assert r.status_code == 413 and "at most 1024 bytes" in r.json()["detail"]
        # At the limit is fine.
        ok = json.dumps({"prompt": STORY, "max_tokens": 1}).encode()
        ok = ok[:-1] + b" " * (1024 - len(ok)) + b"}"
        assert len(ok) == 1024
        r = await c.post("/v1/completions", content=ok, headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        metrics = (await c.get("/metrics")).text
    assert value(metrics, "fleetserve_requests_total", route="/v1/completions", status="413") == 1
    assert value(metrics, "fleetserve_requests_total", route="/metrics", status="413") == 1


async def test_oversized_chunked_body_is_413_without_reading_it_all(default_engine, tokenizer):
    app, _ = make_app(default_engine, tokenizer, max_body_bytes=1024)
    sent = []

    async def chunks(n: int, size: int = 300):
        for i in range(n):
            sent.append(i)
            yield b" " * size

    async with client(app) as c:
        r = await c.post("/v1/completions", content=chunks(1000), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert "over 1024 bytes" in r.json()["error"]["message"]
        assert len(sent) <= 5  # 1024 bytes are exceeded by the 4th chunk; the rest was never pulled

        async def small_json():
            body = json.dumps({"prompt": STORY, "max_tokens": 2, "temperature": 0}).encode()
            for i in range(0, len(body), 7):
                yield body[i:i + 7]

        r = await c.post("/v1/completions", content=small_json(), headers={"Content-Type": "application/json"})
        assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


# ---- configuration -----------------------------------------------------------------------------


def test_config_fields_defaults_and_precedence(tmp_path):
    cfg, sources = load_serve_config({}, env={})
    assert cfg.api_keys == [] and cfg.cors_origins == [] and cfg.metrics_auth is False
    assert cfg.max_body_bytes == DEFAULT_MAX_BODY_BYTES == 4 * 1024 * 1024
    assert cfg.log_file is None and cfg.drain_timeout_s == 30
    env = {"FLEETSERVE_API_KEY": f"{KEY}, {KEY2}", "FLEETSERVE_CORS_ORIGINS": f"{ORIGIN},http://localhost:3000/",
           "FLEETSERVE_MAX_BODY_BYTES": "2048", "FLEETSERVE_METRICS_AUTH": "true",
           "FLEETSERVE_DRAIN_TIMEOUT_S": "5.5", "FLEETSERVE_LOG_FILE": str(tmp_path / "w.log")}
    cfg, sources = load_serve_config({}, env=env)
    assert [k.get_secret_value() for k in cfg.api_keys] == [KEY, KEY2]
    assert sources["api_keys"] == "env FLEETSERVE_API_KEY"
    assert cfg.cors_origins == [ORIGIN, "http://localhost:3000"]
    assert (cfg.max_body_bytes, cfg.metrics_auth, cfg.drain_timeout_s) == (2048, True, 5.5)
    assert cfg.log_file == tmp_path / "w.log"
    # CLI beats env; YAML lists work.
    cfg, sources = load_serve_config({"api_keys": [WRONG]}, env=env)
    assert [k.get_secret_value() for k in cfg.api_keys] == [WRONG] and sources["api_keys"] == "cli"
    yml = tmp_path / "serve.yaml"
    yml.write_text(f"api_keys: [{KEY}]\ncors_origins: ['*']\nmax_body_bytes: 100\n")
    cfg, sources = load_serve_config({}, yml, env={})
    assert [k.get_secret_value() for k in cfg.api_keys] == [KEY] and cfg.cors_origins == ["*"]
    assert sources["max_body_bytes"] == f"yaml {yml}"


@pytest.mark.parametrize(("cli", "field", "needle"), [
    ({"api_keys": ["short"]}, "api_keys", "at least 8"),
    ({"api_keys": ["has space inside"]}, "api_keys", "at least 8 characters without spaces"),
    ({"cors_origins": ["console.example.com"]}, "cors_origins", "scheme://host[:port]"),
    ({"cors_origins": ["https://a.example.com/path"]}, "cors_origins", "scheme://host[:port]"),
    ({"max_body_bytes": 0}, "max_body_bytes", "positive integer"),
    ({"drain_timeout_s": -1}, "drain_timeout_s", ">= 0"),
])
def test_invalid_values_are_explained_without_echoing_keys(cli, field, needle):
    with pytest.raises(ConfigError) as info:
        load_serve_config(cli, env={})
    assert info.value.field == field and needle in str(info.value)
    assert "short" not in str(info.value) and "has space inside" not in str(info.value)


def test_print_config_redacts_keys(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli_app, ["serve", "--print-config", "--api-key", KEY, "--api-key", KEY2,
                                     "--cors-origin", ORIGIN, "--max-body-bytes", "1000", "--metrics-auth",
                                     "--drain-timeout", "3", "--log-file", str(tmp_path / "x.log")],
                           env={"COLUMNS": "300", "FLEETSERVE_API_KEY": ""})
    assert result.exit_code == 0, result.output
    assert KEY not in result.output and KEY2 not in result.output
    for text in ("api_keys", "'***', '***'", ORIGIN, "1000", "metrics_auth", "True", "3.0", "x.log"):
        assert text in result.output, text
    assert config_as_dict(ServeConfig(api_keys=[KEY]))["api_keys"] == ["***"]
    assert config_as_dict(ServeConfig(api_keys=[KEY]), redact=False)["api_keys"] == [KEY]
