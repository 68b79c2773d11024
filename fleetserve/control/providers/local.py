"""Local provider: each replica is a `fleetserve serve` subprocess on a free loopback port.

Replicas run in their own process session, so they outlive a crashed control plane and are
re-adopted on restart (matched by pid *and* command line, so a recycled pid is never mistaken for
a replica). Secrets travel in the child's environment, never on its command line.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import httpx
import psutil

from fleetserve.control.providers.base import Liveness
from fleetserve.control.spec import DeploymentSpec
from fleetserve.control.store import ReplicaRow


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_engine_port(host: str = "127.0.0.1", highest: int = 65000) -> int:
    """A free port low enough for the planner's consecutive engine ports (PD mode uses a few above it)."""
    for _ in range(100):
        port = free_port(host)
        if port <= highest:
            return port
    raise RuntimeError(f"no free port at or below {highest} on {host}")


def _message(line: str) -> str:
    """The text of a log line: the `msg` of a JSON line (how workers log off a TTY), else the line."""
    try:
        record = json.loads(line)
        return str(record.get("msg", line)).strip() if isinstance(record, dict) else line.strip()
    except ValueError:
        return line.strip()


def tail_lines(path: Path, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            return [line.decode(errors="replace").rstrip("\n") for line in deque(f, maxlen=n)]
    except FileNotFoundError:
        return []


class LocalProvider:
    name = "local"

    def __init__(self, home: Path, internal_key: str | None = None):
        self.home = home
        self.internal_key = internal_key
        self._procs: dict[str, subprocess.Popen] = {}  # children started by this process

    def log_path(self, deployment: str, replica_id: str) -> Path:
        return self.home / "logs" / deployment / f"{replica_id}.log"

    def command(self, spec: DeploymentSpec, port: int) -> list[str]:
        """`fleetserve serve` for one replica; sglang / vllm replicas plan their engines themselves (the GPUs of
        this machine) and get a free first engine port, so nothing collides with other local processes."""
        argv = [sys.executable, "-m", "fleetserve", "serve", "--model", spec.model, "--host", "127.0.0.1",
                "--port", str(port), "--served-model-name", spec.name, "--device", spec.device,
                "--precision", spec.precision]
        if spec.backend != "native":
            argv += ["--backend", spec.backend, "--engine-port", str(free_engine_port())]
        if spec.revision:
            argv += ["--revision", spec.revision]
        if spec.max_model_len:
            argv += ["--max-model-len", str(spec.max_model_len)]
        for key, value in sorted(spec.engine_args.items()):
            argv += [f"--{key.replace('_', '-')}", str(value)]
        return argv

    async def start(self, spec: DeploymentSpec, replica_id: str, generation: int) -> ReplicaRow:
        port = free_port()
        log = self.log_path(spec.name, replica_id)
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEETSERVE_", "HATHORA_"))
               and k not in ("HF_TOKEN", "PORT", "HOST", "MODEL_PATH", "DEPLOYMENT_CONFIG_JSON")}
        env["FLEETSERVE_HOME"] = str(self.home)
        env["FLEETSERVE_LOG_FILE"] = str(log.with_suffix(".jsonl"))
        if spec.hf_token is not None:
            env["HF_TOKEN"] = spec.hf_token.get_secret_value()
        if self.internal_key:
            env["FLEETSERVE_API_KEY"] = self.internal_key
        with open(log, "ab") as out:
            proc = subprocess.Popen(self.command(spec, port), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self._procs[replica_id] = proc
        return ReplicaRow(replica_id, spec.name, generation, port, proc.pid, f"http://127.0.0.1:{port}",
                          "starting", time.time(), str(log))

    async def observe(self, r: ReplicaRow) -> Liveness:
        if self.is_alive(r):
            return Liveness(True)
        return Liveness(False, self.exit_code(r), self.failure_reason(r))

    async def stop(self, r: ReplicaRow, force: bool = False) -> None:
        self._signal(r, signal.SIGKILL if force else signal.SIGTERM)

    async def release(self, r: ReplicaRow) -> None:
        self.reap(r)

    async def logs(self, r: ReplicaRow, tail: int) -> list[str]:
        return tail_lines(Path(r.log_path), tail) if r.log_path else []

    def log_file(self, r: ReplicaRow) -> Path | None:
        return Path(r.log_path) if r.log_path else None

    def is_alive(self, r: ReplicaRow) -> bool:
        proc = self._procs.get(r.id)
        if proc is not None:
            return proc.poll() is None
        if not r.pid:
            return False
        try:  # a replica started by an earlier control plane: check it is still *our* process
            p = psutil.Process(r.pid)
            return p.status() != psutil.STATUS_ZOMBIE and "fleetserve" in " ".join(p.cmdline()) \
                and f"--port {r.port}" in " ".join(p.cmdline())
        except psutil.Error:
            return False

    def exit_code(self, r: ReplicaRow) -> int | None:
        proc = self._procs.get(r.id)
        return proc.poll() if proc is not None else None

    async def ready(self, r: ReplicaRow, client: httpx.AsyncClient) -> bool:
        try:
            resp = await client.get(f"{r.url}/readyz", timeout=2.0)
            return resp.status_code == 200
        except httpx.HTTPError:
            return False

    def _signal(self, r: ReplicaRow, sig: int) -> None:
        if not self.is_alive(r):
            return
        try:
            os.kill(r.pid, sig)
        except ProcessLookupError:
            pass

    def reap(self, r: ReplicaRow) -> None:
        proc = self._procs.pop(r.id, None)
        if proc is not None:
            try:
                proc.wait(timeout=0)
            except subprocess.TimeoutExpired:
                pass

    def failure_reason(self, r: ReplicaRow) -> str:
        """The worker's own last error line, to show in status and events."""
        lines = [_message(line) for line in (tail_lines(Path(r.log_path), 60) if r.log_path else [])]
        for line in reversed(lines):
            low = line.lower()
            if "error" in low or "failed" in low or "exception" in low:
                return line[-400:]
        return lines[-1][-400:] if lines else "no output"
