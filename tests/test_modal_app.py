"""The generated Modal app, built offline with Modal's own SDK: `fleetserve deploy --provider modal --dry-run`
prints a file that imports (no Modal account or network needed), and the app object it builds has the GPU,
the scaling (min/max containers, scale-down window, concurrency), the web endpoint and the secret the spec
asks for, and a worker configured by env. Modal keeps these in the function definition it sends at deploy
time; the test reads them there (Modal internals, pinned by the `modal` version in the test extras)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from typer.testing import CliRunner

pytest.importorskip("modal")

from fleetserve.cli import app as cli  # noqa: E402
from fleetserve.config import load_serve_config  # noqa: E402
from fleetserve.control.providers.images import DEFAULT_GPU_IMAGE, DEFAULT_IMAGE  # noqa: E402
from fleetserve.control.providers.modal_app import ModalOptions, render_app  # noqa: E402

TOKEN = "hf_" + "md" * 16


def load(tmp_path, source: str, name: str = "modal_generated"):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def definition(module):
    """(function info, autoscaler settings, web server params) of the app's Worker class."""
    from modal._utils.async_utils import synchronizer

    cls = synchronizer._translate_in(module.Worker)
    fn = cls._class_service_function
    load_fn = fn._load
    closure = dict(zip(load_fn.__code__.co_freevars, load_fn.__closure__))
    web = cls._method_partials["serve"].params.webhook_config
    return fn._function_info, closure["autoscaler_settings"].cell_contents, web


def test_cli_generates_an_app_with_gpu_scaling_and_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    r = CliRunner().invoke(cli, ["deploy", "Qwen/Qwen2.5-0.5B-Instruct", "-n", "qwen", "--provider", "modal",
                                 "--gpus", "2", "--gpu-type", "h100", "--min", "0", "--max", "3",
                                 "--max-model-len", "4096", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert TOKEN not in r.output
    module = load(tmp_path, r.stdout)
    assert module.app.name == "fleetserve-qwen"
    info, scaling, web = definition(module)
    assert info.gpus == [("H100", 2)]
    assert info.secrets == ["modal.Secret.from_name('fleetserve-qwen')"]
    assert (scaling.min_containers, scaling.max_containers, scaling.scaledown_window) == (0, 3, 300)
    assert info.concurrency_info.target_inputs == 4 and info.concurrency_info.max_inputs == 64
    assert web.web_server_port == 8000 and web.web_server_startup_timeout == 1200
    assert module.IMAGE == DEFAULT_GPU_IMAGE
    env = module.WORKER_ENV
    assert json.loads(env["DEPLOYMENT_CONFIG_JSON"]) == {"model": "Qwen/Qwen2.5-0.5B-Instruct", "precision": "auto",
                                                         "device": "cuda", "max_model_len": 4096}
    cfg, _ = load_serve_config({}, env=env)  # the worker accepts exactly this env
    assert (cfg.host, cfg.port, cfg.served_model_name, cfg.device) == ("0.0.0.0", 8000, "qwen", "cuda")


def test_cpu_app_and_options(tmp_path):
    opts = ModalOptions(name="small", replicas={"min": 1, "max": 2}, cpu=2, memory_mb=4096, scaledown_window_s=60,
                        target_concurrency=8)
    module = load(tmp_path, render_app(opts), "modal_small")
    info, scaling, _ = definition(module)
    assert info.gpus == [] and info.cpu == 2 and info.memory_mib == 4096
    assert (scaling.min_containers, scaling.max_containers, scaling.scaledown_window) == (1, 2, 60)
    assert info.concurrency_info.target_inputs == 8 and module.IMAGE == DEFAULT_IMAGE
    assert json.loads(module.WORKER_ENV["DEPLOYMENT_CONFIG_JSON"])["device"] == "cpu"


@pytest.mark.parametrize("args,expect", [
    (["--gpus", "1"], "GPU type"),
    (["--gpus", "1", "--gpu-type", "V100"], "unknown Modal GPU type"),
    (["--region", "Tokyo"], "region"),
    (["--namespace", "x"], "kubernetes"),
])
def test_invalid_modal_options_are_rejected(args, expect):
    r = CliRunner().invoke(cli, ["deploy", "default", "-n", "m", "--provider", "modal", "--dry-run", *args])
    assert r.exit_code == 2 and expect in r.output, r.output


def test_modal_needs_dry_run():
    r = CliRunner().invoke(cli, ["deploy", "default", "-n", "m", "--provider", "modal"])
    assert r.exit_code == 2 and "--dry-run" in r.output and "modal deploy" in r.output
