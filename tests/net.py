"""Loopback plumbing shared by the tests: a free port, and an ASGI app under uvicorn in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

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
