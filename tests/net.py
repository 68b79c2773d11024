"""Loopback plumbing shared by the tests: a free port, an ASGI app under uvicorn in a background thread, and
polling until a server or deployment reaches a state."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(app, **config) -> Iterator[str]:
    """The app under uvicorn on a loopback port (lifespan included); yields its base URL and stops it after.

    log_config=None lets uvicorn's loggers propagate to the root logger, so caplog sees server errors."""
    port = free_port()
    cfg = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, **config)
    cfg.install_signal_handlers = False  # not the main thread
    server = uvicorn.Server(cfg)
    thread = threading.Thread(target=server.run, name=f"test-uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "uvicorn did not stop"


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Polls `predicate` until it returns something truthy (returned) or `timeout` seconds pass (AssertionError
    with the last value). HTTP errors count as "not yet"; with `proc`, its exit fails at once, and `log`'s
    tail goes into the message."""
    tail = (lambda: log.read_text()[-3000:]) if log is not None else (lambda: "")
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}:\n{tail()}")
        try:
            last = predicate()
            if last:
                return last
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; last: {last}\n{tail()}")
