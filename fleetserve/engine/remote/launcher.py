"""Start a plan's engine processes, wait until each answers its readiness URL, watch them, stop them.

Each process runs in its own session (process group) with the plan's env on top of the worker's
(CUDA_VISIBLE_DEVICES per process; secrets such as HF_TOKEN are passed by the caller, never stored
in the plan), its stdout and stderr appended to `<log_dir>/<name>.log`. Engines start first and the
router last. The first process to exit is reported by `failed()`; `stop()` sends SIGTERM to every
group, then SIGKILL after the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from fleetserve.planner.types import Process

log = logging.getLogger("fleetserve.remote")
_ORDER = {"prefill": 0, "decode": 0, "unified": 0, "router": 1}


class LaunchError(RuntimeError):
    """An engine process exited or never became ready; the message names it and quotes its log."""


@dataclass
class Running:
    spec: Process
    popen: subprocess.Popen
    log_path: Path
    started_at: float
    ready: bool = False

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()


class EngineLauncher:
    def __init__(self, processes: Sequence[Process], log_dir: Path, extra_env: Mapping[str, str] | None = None,
                 python: str | None = None) -> None:
        self.processes = sorted(processes, key=lambda p: _ORDER.get(p.role, 0))
        self.log_dir = Path(log_dir)
        self.extra_env = dict(extra_env or {})
        self.python = python  # replaces a leading "python3"/"python" in argv (e.g. sys.executable)
        self.running: list[Running] = []
        self.stopping = False

    # ------------------------------------------------------------ start / stop

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for proc in self.processes:
            argv = list(proc.argv)
            if self.python and argv and argv[0] in ("python3", "python"):
                argv[0] = self.python
            env = {**os.environ, **self.extra_env, **proc.env}
            path = self.log_dir / f"{proc.name}.log"
            with open(path, "ab") as out:
                popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)
            self.running.append(Running(proc, popen, path, time.monotonic()))
            log.info("started %s (%s, pid %d, GPUs %s): %s", proc.name, proc.role, popen.pid,
                     proc.env.get("CUDA_VISIBLE_DEVICES", "-"), proc.command)

    def stop(self, grace_s: float = 10.0) -> None:
        self.stopping = True
        for r in self.running:
            if r.returncode is None:
                _signal_group(r.popen, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for r in self.running:
            try:
                r.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not exit within %.0fs of SIGTERM; killing it", r.spec.name, grace_s)
                _signal_group(r.popen, signal.SIGKILL)
                r.popen.wait(timeout=5)

    # ------------------------------------------------------------ state

    def failed(self) -> tuple[str, int] | None:
        """(name, exit code) of the first process that exited, or None while all run."""
        for r in self.running:
            code = r.returncode
            if code is not None:
                return r.spec.name, code
        return None

    @property
    def ready(self) -> bool:
        return bool(self.running) and all(r.ready for r in self.running) and self.failed() is None

    def log_tail(self, name: str, lines: int = 20) -> str:
        for r in self.running:
            if r.spec.name == name:
                try:
                    return "\n".join(r.log_path.read_text(errors="replace").splitlines()[-lines:])
                except OSError:
                    return ""
        return ""

    def describe(self) -> list[dict]:
        return [{"name": r.spec.name, "role": r.spec.role, "pid": r.popen.pid, "url": r.spec.url,
                 "gpus": r.spec.gpus, "ready": r.ready, "exit_code": r.returncode, "log": str(r.log_path)}
                for r in self.running]

    # ------------------------------------------------------------ readiness

    async def wait_ready(self, timeout_s: float = 1800.0, poll_s: float = 0.5) -> None:
        """Until every process answers 200 on its ready_path; LaunchError if one exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=5.0) as client:
            while True:
                self._raise_if_failed()
                pending = [r for r in self.running if not r.ready]
                if not pending:
                    return
                for r in pending:
                    try:
                        resp = await client.get(r.spec.url + r.spec.ready_path)
                        if resp.status_code == 200:
                            r.ready = True
                            log.info("%s is ready after %.1fs", r.spec.name, time.monotonic() - r.started_at)
                    except httpx.HTTPError:
                        pass
                if time.monotonic() > deadline:
                    names = ", ".join(r.spec.name for r in self.running if not r.ready)
                    raise LaunchError(f"engine process(es) {names} not ready after {timeout_s:.0f}s")
                await asyncio.sleep(poll_s)

    def _raise_if_failed(self) -> None:
        dead = self.failed()
        if dead:
            name, code = dead
            tail = self.log_tail(name, 15)
            raise LaunchError(f"engine process {name} exited with code {code}" + (f"; last log lines:\n{tail}"
                                                                                   if tail else ""))


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)  # the process and everything it started (TP workers)
    except (ProcessLookupError, PermissionError):
        try:
            popen.send_signal(sig)
        except ProcessLookupError:
            pass


def missing_engine(processes: Sequence[Process]) -> str | None:
    """Why a process of the plan cannot start here (its engine is not installed), or None.

    `python -m MODULE` needs MODULE importable by that interpreter (checked without importing it when
    the interpreter is this one); any other command must be on PATH.
    """
    import importlib.util
    import shutil
    import sys

    for proc in processes:
        argv = proc.argv
        if not argv:
            return f"engine process {proc.name} has an empty command line"
        if len(argv) >= 3 and argv[1] == "-m":
            module = argv[2]
            if argv[0] in (sys.executable, "python3", "python"):
                try:
                    found = importlib.util.find_spec(module.split(".")[0]) is not None
                except (ImportError, ValueError):
                    found = False
                if not found:
                    package = module.split(".")[0].replace("_", "-")
                    return (f"engine process {proc.name} runs `python -m {module}`, but {package} is not installed "
                            f"for {sys.executable}; install it (pip install {package})")
                continue
        if shutil.which(argv[0]) is None:
            return (f"engine process {proc.name} runs `{argv[0]}`, which is not on PATH; install it "
                    f"(pip install {argv[0]})")
    return None
