"""The `fleetserve` CLI: help, --print-config, --dry-run, models and version. Fast: no model is loaded."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import fleetserve.models
from fleetserve import __version__
from fleetserve.cli import app
from fleetserve.models import ModelFiles, ModelResolutionError
from tests import net

TOKEN = "hf_abcdefghijklmnopqrstuvwxyz123456"
_ENV_PREFIXES = ("FLEETSERVE_", "HATHORA_", "HF_")
_ENV_NAMES = {"MODEL_PATH", "PORT", "LOG_LEVEL", "MAX_TOTAL_TOKENS", "HOST", "DEPLOYMENT_CONFIG_JSON", "TP_SIZE",
              "H100_ONLY", "ENABLE_PD_DEFAULTS"}
_ENV_PREFIXES_SEED = ("SPECULATIVE_", "DISAGG_")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """Nothing from the real environment leaks in; model caches point into tmp."""
    for name in list(os.environ):
        if name in _ENV_NAMES or name.startswith(_ENV_PREFIXES + _ENV_PREFIXES_SEED):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FLEETSERVE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "250")  # no wrapping, so a leaked token could not hide across lines


@pytest.fixture
def runner():
    return CliRunner()


def invoke(runner, args, env=None):
    return runner.invoke(app, args, env={"COLUMNS": "250", **(env or {})})


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    """resolve_model succeeds without touching disk or network; records its calls."""
    calls = []

    def resolve(spec, *, revision=None, hf_token=None, download=True, progress=True, **_):
        calls.append({"spec": spec, "revision": revision, "hf_token": hf_token, "download": download,
                      "progress": progress})
        return ModelFiles(spec=spec, name="Fake/Model", format="gguf", path=tmp_path / "fake.gguf", source="default")

    monkeypatch.setattr(fleetserve.models, "resolve_model", resolve)
    return calls


@pytest.fixture(name="free_port")
def free_port_fixture() -> int:
    return net.free_port()


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def _rows(output: str) -> dict[str, list[str]]:
    """Table rows of --print-config as {field: [value, source]}."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│┃").split("│")]
        if len(cells) == 3 and cells[0]:
            rows[cells[0]] = cells[1:]
    return rows


# ------------------------------------------------------------------ help and version


def test_help_reads_like_a_man_page(runner):
    result = invoke(runner, ["--help"])
    assert result.exit_code == 0
    assert "OpenAI-compatible" in result.output and "Examples" in result.output
    result = invoke(runner, ["serve", "--help"])
    assert result.exit_code == 0
    for text in ("--dtype", "--print-config", "--dry-run", "Precedence", "Examples", "FLEETSERVE_"):
        assert text in result.output


def test_version(runner):
    for args in (["version"], ["--version"]):
        result = invoke(runner, args)
        assert result.exit_code == 0 and __version__ in result.output


def test_help_and_print_config_stay_light():
    """--help and --print-config must not import torch or the server (checked in a fresh interpreter)."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from fleetserve.cli import app\n"
        "r = CliRunner()\n"
        "assert r.invoke(app, ['serve', '--help']).exit_code == 0\n"
        "assert r.invoke(app, ['serve', '--print-config']).exit_code == 0\n"
        "print(sorted(m for m in ('torch', 'fleetserve.server', 'fleetserve.engine') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ --print-config


def test_print_config_shows_values_and_sources(runner, tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("max_batch_tokens: 512\nblock_size: 32\n")
    env = {"FLEETSERVE_MAX_RUNNING_SEQS": "8", "PORT": "9100", "MAX_TOTAL_TOKENS": "4096",
           "DEPLOYMENT_CONFIG_JSON": json.dumps({"model_id": "org/model", "block_size": 64})}
    result = invoke(runner, ["serve", "--print-config", "--config", str(cfg), "--dtype", "bf16", "--port", "9200"],
                    env)
    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    assert rows["port"] == ["9200", "cli"]
    assert rows["precision"] == ["bf16", "cli"]
    assert rows["max_running_seqs"] == ["8", "env FLEETSERVE_MAX_RUNNING_SEQS"]
    assert rows["kv_cache_tokens"] == ["4096", "env MAX_TOTAL_TOKENS"]
    assert rows["model"] == ["org/model", "DEPLOYMENT_CONFIG_JSON"]
    assert rows["block_size"] == ["64", "DEPLOYMENT_CONFIG_JSON"]
    assert rows["max_batch_tokens"] == ["512", f"yaml {cfg}"]
    assert rows["max_queue_len"] == ["256", "default"]
    assert rows["hf_token"] == ["unset", "default"]


@pytest.mark.parametrize("where", ["cli", "env HF_TOKEN", "env FLEETSERVE_HF_TOKEN", "DEPLOYMENT_CONFIG_JSON"])
def test_print_config_never_prints_the_token(runner, where):
    args, env = ["serve", "--print-config"], {}
    if where == "cli":
        args += ["--hf-token", TOKEN]
    elif where.startswith("env "):
        env[where.removeprefix("env ")] = TOKEN
    else:
        env["DEPLOYMENT_CONFIG_JSON"] = json.dumps({"hf_token": TOKEN})
    result = invoke(runner, args, env)
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.output and TOKEN[:10] not in result.output
    assert _rows(result.output)["hf_token"] == ["***", where]


def test_hathora_env_binds_all_interfaces(runner):
    result = invoke(runner, ["serve", "--print-config"], {"HATHORA_DEFAULT_PORT": "7777", "HATHORA_REGION": "Tokyo"})
    rows = _rows(result.output)
    assert rows["host"][0] == "0.0.0.0" and rows["port"] == ["7777", "env HATHORA_DEFAULT_PORT"]
    assert rows["hathora_region"] == ["Tokyo", "env HATHORA_REGION"]


# ------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
    "args, env, expected",
    [
        (["--port", "70000"], {}, ["port", "cli", "1 to 65535"]),
        (["--block-size", "24"], {}, ["block_size", "cli", "8, 16, 32, 64, 128"]),
        ([], {"PORT": "http"}, ["port", "env PORT", "1 to 65535"]),
        ([], {"DEPLOYMENT_CONFIG_JSON": '{"model_id": "org/m", "replicas": 2}'},
         ["replicas", "not supported yet", "DEPLOYMENT_CONFIG_JSON"]),
        ([], {"DEPLOYMENT_CONFIG_JSON": '{"model_id": "org/m", "quantization": "awq"}'},
         ["quantization", "DEPLOYMENT_CONFIG_JSON", "sglang and vllm backends", "--backend"]),
        (["--backend", "sglang", "--model", "org/m", "--max-batch-tokens", "64"], {},
         ["max_batch_tokens", "cli", "native engine", "sglang backend"]),
        (["--backend", "tgi"], {}, ["backend", "cli", "native, sglang, vllm"]),
        (["--dtype", "fp8"], {}, ["precision", "cli", "auto, fp32, bf16, fp16"]),
    ],
)
def test_config_errors_exit_2_with_field_source_and_allowed(runner, args, env, expected):
    for mode in ("--print-config", "--dry-run"):
        result = invoke(runner, ["serve", mode, *args], env)
        assert result.exit_code == 2, result.output
        for text in expected:
            assert text in result.output


def test_missing_config_file(runner, tmp_path):
    result = invoke(runner, ["serve", "--print-config", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "nope.yaml" in result.output


# ------------------------------------------------------------------ --dry-run


def test_dry_run_rejects_triton_attention_without_a_gpu(runner, fake_model, free_port, no_gpu):
    result = invoke(runner, ["serve", "--dry-run", "--port", str(free_port), "--attention-backend", "triton"])
    assert result.exit_code == 2, result.output
    assert "attention_backend 'triton' runs on CUDA GPUs" in result.output


def test_dry_run_success(runner, fake_model, free_port, no_gpu):
    result = invoke(runner, ["serve", "--dry-run", "--port", str(free_port), "--revision", "v1"],
                    {"HF_TOKEN": TOKEN})
    assert result.exit_code == 0, result.output
    assert "ok" in result.output and f"127.0.0.1:{free_port} free" in result.output
    assert "Fake/Model" in result.output and "cpu (float32)" in result.output
    assert TOKEN not in result.output
    assert fake_model == [{"spec": "default", "revision": "v1", "hf_token": TOKEN, "download": False,
                           "progress": False}]


def test_dry_run_port_in_use(runner, fake_model, no_gpu):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = invoke(runner, ["serve", "--dry-run", "--port", str(port)])
    assert result.exit_code == 2
    assert f"port {port} on 127.0.0.1 is already in use" in result.output


def test_dry_run_host_not_on_this_machine(runner, fake_model, free_port, no_gpu):
    result = invoke(runner, ["serve", "--dry-run", "--host", "203.0.113.7", "--port", str(free_port)])
    assert result.exit_code == 2 and "203.0.113.7" in result.output and "--host" in result.output


def test_dry_run_missing_model_path(runner, free_port, no_gpu, tmp_path):
    missing = tmp_path / "no-such-model"
    result = invoke(runner, ["serve", "--dry-run", "--model", str(missing), "--port", str(free_port)])
    assert result.exit_code == 2
    assert str(missing) in result.output and "no such file or directory" in result.output


def test_dry_run_default_model_not_pulled(runner, free_port, no_gpu):
    # FLEETSERVE_HOME is an empty tmp dir, so the real resolver finds no cached default model.
    result = invoke(runner, ["serve", "--dry-run", "--port", str(free_port)])
    assert result.exit_code == 2
    assert "fleetserve models pull default" in result.output


def test_dry_run_hub_model_not_cached_suggests_pull(runner, free_port, no_gpu, monkeypatch):
    def resolve(spec, **_):
        raise ModelResolutionError(f"{spec} is not cached")

    monkeypatch.setattr(fleetserve.models, "resolve_model", resolve)
    result = invoke(runner, ["serve", "--dry-run", "--model", "org/name", "--port", str(free_port)])
    assert result.exit_code == 2 and "fleetserve models pull org/name" in result.output


def test_dry_run_cuda_requested_on_cpu_machine(runner, fake_model, free_port, no_gpu):
    result = invoke(runner, ["serve", "--dry-run", "--device", "cuda", "--port", str(free_port)])
    assert result.exit_code == 2
    assert "'cuda' was requested" in result.output and "cpu" in result.output


# ------------------------------------------------------------------ serving hands over to the server


def test_serve_calls_run_server_with_the_resolved_config(runner, monkeypatch, free_port):
    import logging

    seen, seen_sources = [], []
    fake = types.ModuleType("fleetserve.server.app")
    fake.run_server = lambda cfg, sources=None: (seen.append(cfg), seen_sources.append(sources))
    monkeypatch.setitem(sys.modules, "fleetserve.server.app", fake)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        result = invoke(runner, ["serve", "--port", str(free_port), "--model", "m"], {"LOG_LEVEL": "WARNING"})
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    assert (cfg.port, cfg.model, cfg.log_level, cfg.backend) == (free_port, "m", "warning", "native")
    assert seen_sources[0]["log_level"] == "env LOG_LEVEL" and seen_sources[0]["port"] == "cli"


# ------------------------------------------------------------------ models


def test_models_pull_uses_download_and_env_token(runner, fake_model):
    result = invoke(runner, ["models", "pull"], {"HF_TOKEN": TOKEN})
    assert result.exit_code == 0, result.output
    assert "fake.gguf" in result.output and TOKEN not in result.output
    assert fake_model[0] == {"spec": "default", "revision": None, "hf_token": TOKEN, "download": True,
                             "progress": True}


def test_models_pull_failure_exit_2_without_token(runner, monkeypatch):
    def resolve(spec, *, hf_token=None, **_):
        raise ModelResolutionError(f"{spec} refused token {hf_token}")

    monkeypatch.setattr(fleetserve.models, "resolve_model", resolve)
    result = invoke(runner, ["models", "pull", "org/private", "--hf-token", TOKEN])
    assert result.exit_code == 2 and "org/private refused token ***" in result.output
    assert TOKEN not in result.output


def test_models_path(runner, fake_model, tmp_path):
    result = invoke(runner, ["models", "path", "default"])
    assert result.exit_code == 0 and result.output.strip() == str(tmp_path / "fake.gguf")
    assert fake_model[0]["download"] is False


def test_models_path_missing_exits_2(runner):
    result = invoke(runner, ["models", "path", "default"])
    assert result.exit_code == 2 and "fleetserve models pull default" in result.output
