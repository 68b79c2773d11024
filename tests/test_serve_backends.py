"""`fleetserve serve --backend sglang|vllm`: the config becomes a plan, the plan's engines are launched and
fronted, and without GPUs the worker exits 2 with the planner's message.

GPUs and engines are stand-ins reached through the real code paths, nothing monkeypatched in the worker:
a fake `nvidia-smi` on PATH describes an H100 to the hardware detection, a fake `sglang` package on
PYTHONPATH answers `python -m sglang.launch_server ...` and a fake `vllm` on PATH answers `vllm serve ...`;
both record their command line and env, then serve tests/fixtures/remote/fake_engine.py (a recorded
/metrics sample, /health, a chat completion).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from fleetserve.cli import app
from fleetserve.config import load_serve_config
from fleetserve.planner.hardware import Hardware, detect_hardware, synthetic_hardware
from fleetserve.planner.serve import plan_for_config, plan_spec
from fleetserve.planner.types import PlanError
from tests.net import free_port

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
MODEL = str(FIXTURES / "model_configs" / "Qwen2.5-0.5B-Instruct")  # config.json only: enough to plan
TOKEN = "hf_" + "t0ken" * 7
H100 = "NVIDIA H100 80GB HBM3, 81559, 9.0"
A100 = "NVIDIA A100-SXM4-80GB, 81920, 8.0"
_CLEAN_PREFIXES = ("FLEETSERVE_", "HATHORA_", "HF_", "SPECULATIVE_", "DISAGG_")
_CLEAN_NAMES = {"MODEL_PATH", "PORT", "HOST", "LOG_LEVEL", "MAX_TOTAL_TOKENS", "TP_SIZE", "H100_ONLY",
                "ENABLE_PD_DEFAULTS", "DEPLOYMENT_CONFIG_JSON", "PYTHONPATH"}

FAKE_ENGINE = textwrap.dedent("""
    import argparse, json, os, runpy, sys
    from pathlib import Path

    fixtures = Path({fixtures!r})
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args, _ = parser.parse_known_args()
    record = os.environ.get("FAKE_ENGINE_RECORD")
    if record:
        Path(record).write_text(json.dumps({{"argv": sys.argv[1:], "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                             "hf_token": os.environ.get("HF_TOKEN")}}))
    sys.argv = [str(fixtures / "fake_engine.py"), str(args.port), str(fixtures / {metrics!r})]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")



@pytest.fixture
def stand_ins(tmp_path):
    """Directories to put on PATH (fake nvidia-smi, fake vllm) and PYTHONPATH (fake sglang)."""
    gpu_bin, engine_bin, pkgs = tmp_path / "gpu-bin", tmp_path / "engine-bin", tmp_path / "pkgs"
    for d in (gpu_bin, engine_bin, pkgs / "sglang"):
        d.mkdir(parents=True)

    def gpus(*lines: str) -> Path:
        script = gpu_bin / "nvidia-smi"
        body = "\n".join(f"echo '{line}'" for line in lines)
        script.write_text(f"#!/bin/sh\ncase \"$1\" in topo) echo 'GPU0 X NV18';; *) {body};; esac\n")
        script.chmod(0o755)
        return gpu_bin

    (pkgs / "sglang" / "__init__.py").write_text("")
    remote = str(FIXTURES / "remote")
    (pkgs / "sglang" / "launch_server.py").write_text(FAKE_ENGINE.format(fixtures=remote, metrics="sglang_metrics.txt"))
    vllm = engine_bin / "vllm"
    vllm.write_text(f"#!{sys.executable}\n" + FAKE_ENGINE.format(fixtures=remote, metrics="vllm_metrics.txt"))
    vllm.chmod(0o755)
    gpus(H100)
    return {"gpus": gpus, "gpu_bin": gpu_bin, "engine_bin": engine_bin, "pkgs": pkgs}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLEAN_NAMES and not k.startswith(_CLEAN_PREFIXES)}
    env.update(HF_HUB_OFFLINE="1", COLUMNS="250", **extra)
    return env


# ---------------------------------------------------------------- ServeConfig -> PlanSpec -> Plan


def test_plan_spec_carries_only_what_was_set_with_its_source():
    cfg, sources = load_serve_config({"backend": "sglang", "model": MODEL},
                                     env={"TP_SIZE": "1", "MAX_TOTAL_TOKENS": "65536", "FLEETSERVE_MAX_QUEUE_LEN": "7",
                                          "ENABLE_PD_DEFAULTS": "false", "HF_TOKEN": TOKEN})
    spec, spec_sources = plan_spec(cfg, sources)
    assert (spec.backend, spec.tp_size, spec.max_total_tokens, spec.max_queued_requests, spec.pd) == \
        ("sglang", 1, 65536, 7, "off")
    assert spec.python == sys.executable
    assert spec_sources == {"backend": "cli", "model": "cli", "tp_size": "env TP_SIZE", "pd": "env ENABLE_PD_DEFAULTS",
                            "max_total_tokens": "env MAX_TOTAL_TOKENS", "max_queued_requests": "env FLEETSERVE_MAX_QUEUE_LEN"}
    assert "precision" not in spec.model_fields_set and "port" not in spec.model_fields_set  # planner defaults apply
    plan = plan_for_config(cfg, sources, detect=lambda: synthetic_hardware("H100", 1))
    (engine,) = plan.processes
    assert engine.argv[:3] == [sys.executable, "-m", "sglang.launch_server"]
    for flags in (["--max-total-tokens", "65536"], ["--max-queued-requests", "7"], ["--quantization", "fp8"]):
        assert " ".join(flags) in " ".join(engine.argv)
    assert TOKEN not in json.dumps(plan.to_dict())
    decisions = {d.setting: d.reason for d in plan.decisions}
    assert decisions["tp_size"] == "explicit (from env TP_SIZE)"


def test_plan_errors_name_the_problem():
    def cfg(**cli):
        return load_serve_config({"backend": "sglang", "model": MODEL, **cli}, env={})

    with pytest.raises(PlanError, match="needs NVIDIA GPUs and this machine has no GPU"):
        plan_for_config(*cfg(), detect=lambda: Hardware(source="none"))
    with pytest.raises(PlanError, match=r"tp_size 2 \(from cli\) needs 2 GPUs"):
        plan_for_config(*cfg(tp_size=2), detect=lambda: synthetic_hardware("H100", 1))
    with pytest.raises(PlanError, match=r"invalid kv_cache_tokens 8 \(from cli\) for the sglang backend"):
        plan_for_config(*cfg(kv_cache_tokens=8), detect=lambda: synthetic_hardware("H100", 1))
    with pytest.raises(PlanError, match="model 'default' is the embedded GGUF model of the native engine"):
        plan_for_config(*load_serve_config({"backend": "vllm"}, env={}), detect=lambda: synthetic_hardware("L4", 1))
    with pytest.raises(PlanError, match=r"h100_only is set \(from cli\) but this machine has 1 x NVIDIA A100"):
        plan_for_config(*cfg(h100_only=True), detect=lambda: synthetic_hardware("A100", 1))


# ---------------------------------------------------------------- the CLI: no GPU, --print-config, --dry-run


def test_serve_without_gpus_exits_2_with_the_planners_message(tmp_path):
    if detect_hardware().count:
        pytest.skip("this machine has NVIDIA GPUs")
    for backend in ("sglang", "vllm"):
        out = subprocess.run([sys.executable, "-m", "fleetserve", "serve", "--backend", backend, "--model",
                              "Qwen/Qwen2.5-7B-Instruct", "--port", str(free_port())], cwd=ROOT, capture_output=True,
                             text=True, timeout=120, env=clean_env(FLEETSERVE_HOME=str(tmp_path), HF_TOKEN=TOKEN))
        assert out.returncode == 2, out.stderr[-2000:]
        assert f"plan failed for the {backend} backend: the {backend} backend needs NVIDIA GPUs and this machine " \
               "has no GPU (CPU only); use --backend native" in out.stderr
        assert TOKEN not in out.stdout + out.stderr
        assert "Traceback" not in out.stderr


@pytest.fixture
def cli(monkeypatch, tmp_path, stand_ins):
    for name in list(os.environ):
        if name in _CLEAN_NAMES or name.startswith(_CLEAN_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FLEETSERVE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PATH", f"{stand_ins['gpu_bin']}:{os.environ['PATH']}")
    monkeypatch.syspath_prepend(str(stand_ins["pkgs"]))  # `sglang` is found (the fake, or a real install)
    runner = CliRunner()

    def invoke(*args: str, env: dict | None = None):
        return runner.invoke(app, ["serve", *args], env={"COLUMNS": "250", **(env or {})})

    return invoke


def test_print_config_includes_the_plan(cli):
    result = cli("--backend", "sglang", "--model", MODEL, "--print-config", env={"TP_SIZE": "1"})
    assert result.exit_code == 0, result.output
    assert "backend" in result.output and "env TP_SIZE" in result.output  # the config table
    assert "fleetserve plan  backend sglang" in result.output and "1 x NVIDIA H100 80GB HBM3" in result.output
    assert "sglang.launch_server" in result.output and "quantization fp8" in result.output
    assert "explicit (from env TP_SIZE)" in result.output  # decisions keep the config's sources
    bad = cli("--backend", "sglang", "--model", MODEL, "--print-config", env={"TP_SIZE": "2"})
    assert bad.exit_code == 2 and "tp_size 2 (from env TP_SIZE) needs 2 GPUs" in bad.output
    default = cli("--backend", "vllm", "--print-config")
    assert default.exit_code == 2 and "model 'default' is the embedded GGUF model" in default.output


def test_dry_run_checks_plan_ports_and_engine_install(cli, stand_ins, monkeypatch):
    port, engine_port = free_port(), free_port()
    ok = cli("--backend", "sglang", "--model", MODEL, "--dry-run", "--port", str(port), "--engine-port",
             str(engine_port))
    assert ok.exit_code == 0, ok.output
    assert "processes" in ok.output and "decisions" in ok.output  # the plan's tables
    assert "ok config valid; plan sglang unified on 1 x NVIDIA H100 80GB HBM3" in ok.output
    assert f"127.0.0.1:{port} free; engine ports {engine_port} free; engine installed" in ok.output

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        result = cli("--backend", "sglang", "--model", MODEL, "--dry-run", "--port", str(port), "--engine-port",
                     str(taken))
    assert result.exit_code == 2 and f"engine port: port {taken} on 127.0.0.1 is already in use" in result.output
    assert "--engine-port" in result.output

    no_vllm = cli("--backend", "vllm", "--model", MODEL, "--dry-run", "--port", str(port), "--engine-port",
                  str(engine_port), env={"PATH": str(stand_ins["gpu_bin"])})
    assert no_vllm.exit_code == 2 and "runs `vllm`, which is not on PATH" in no_vllm.output
    monkeypatch.setenv("PATH", f"{stand_ins['engine_bin']}:{os.environ['PATH']}")
    with_vllm = cli("--backend", "vllm", "--model", MODEL, "--dry-run", "--port", str(port), "--engine-port",
                    str(engine_port))
    assert with_vllm.exit_code == 0 and "plan vllm unified" in with_vllm.output

    stand_ins["gpus"](A100)
    guard = cli("--backend", "sglang", "--model", MODEL, "--dry-run", env={"H100_ONLY": "1"})
    assert guard.exit_code == 2
    assert "h100_only is set (from env H100_ONLY) but this machine has 1 x NVIDIA A100-SXM4-80GB" in guard.output


# ---------------------------------------------------------------- end to end: the CLI launches and fronts the engine


class Worker:
    def __init__(self, tmp_path: Path, stand_ins, backend: str, *args: str) -> None:
        self.port, self.engine_port = free_port(), free_port()
        self.record = tmp_path / f"{backend}-engine.json"
        env = clean_env(PATH=f"{stand_ins['gpu_bin']}:{stand_ins['engine_bin']}:{os.environ['PATH']}",
                        PYTHONPATH=str(stand_ins["pkgs"]), FLEETSERVE_HOME=str(tmp_path / "home"), HF_TOKEN=TOKEN,
                        FAKE_ENGINE_RECORD=str(self.record))
        self.proc = subprocess.Popen([sys.executable, "-m", "fleetserve", "serve", "--backend", backend, "--model", MODEL,
                                      "--port", str(self.port), "--engine-port", str(self.engine_port),
                                      "--drain-timeout", "5", *args],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read().decode()[-3000:]
            try:
                if self.client.get("/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("the worker never became ready")

    def stop(self) -> tuple[int, str]:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode, self.proc.stdout.read().decode()


@pytest.fixture
def worker(tmp_path, stand_ins):
    workers: list[Worker] = []

    def start(backend: str, *args: str) -> Worker:
        w = Worker(tmp_path, stand_ins, backend, *args)
        workers.append(w)
        return w

    yield start
    for w in workers:
        w.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_serve_sglang_launches_the_planned_engine_and_fronts_it(worker):
    w = worker("sglang", "--served-model-name", "qwen", "--api-key", "front-key-123", "--cors-origin",
               "https://app.example.com")
    w.wait_ready()
    health = w.client.get("/health").json()
    assert (health["status"], health["backend"], health["pd_mode"], health["model"]) == ("ok", "sglang", False, "qwen")
    assert health["engine_url"] == f"http://127.0.0.1:{w.engine_port}"
    (engine,) = health["processes"]
    assert engine["name"] == "engine" and engine["gpus"] == [0] and engine["ready"]

    record = json.loads(w.record.read_text())
    argv = " ".join(record["argv"])
    assert f"--model-path {MODEL} --served-model-name qwen --tp-size 1 --host 127.0.0.1 --port {w.engine_port}" in argv
    assert "--quantization fp8 --kv-cache-dtype fp8_e5m2" in argv and "--enable-metrics" in argv
    assert record["cuda"] == "0" and record["hf_token"] == TOKEN and TOKEN not in argv  # the token: env only

    auth = {"Authorization": "Bearer front-key-123"}
    assert w.client.post("/v1/chat/completions", json={"messages": []}).status_code == 401
    reply = w.client.post("/v1/chat/completions", json={"model": "qwen", "messages": []}, headers=auth)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "Paris"
    assert reply.json()["seen"]["auth"] is None  # fleetserve's key stays with fleetserve
    metrics = w.client.get("/metrics").text
    assert "fleetserve_num_requests_running 12.0" in metrics and "sglang:num_running_reqs{" in metrics
    preflight = w.client.options("/v1/chat/completions", headers={
        "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization"})
    assert preflight.headers.get("access-control-allow-origin") == "https://app.example.com"

    code, output = w.stop()
    assert code == 0, output[-3000:]  # drained and exited cleanly
    assert not _alive(engine["pid"])  # the engine went with it
    assert TOKEN not in output


def test_serve_vllm_launches_vllm_serve(worker):
    w = worker("vllm", "--tp-size", "1", "--max-model-len", "4096")
    w.wait_ready()
    health = w.client.get("/health").json()
    assert health["backend"] == "vllm" and health["max_model_len"] == 4096
    argv = json.loads(w.record.read_text())["argv"]
    assert argv[:2] == ["serve", MODEL]
    assert " ".join(argv[2:]).startswith(f"--host 127.0.0.1 --port {w.engine_port} --tensor-parallel-size 1")
    assert "--max-model-len 4096" in " ".join(argv) and "--quantization fp8" in " ".join(argv)
    reply = w.client.post("/v1/chat/completions", json={"messages": [], "stream": True})
    assert reply.status_code == 200 and "Paris" in reply.text
    assert "fleetserve_num_requests_running 7.0" in w.client.get("/metrics").text
    code, output = w.stop()
    assert code == 0, output[-3000:]
