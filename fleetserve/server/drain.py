"""Graceful drain on SIGTERM / SIGINT: stop taking work, finish what is running, exit 0.

The first signal marks the worker as draining: /readyz answers 503 at once (so load balancers and the
gateway stop sending), new inference requests get 503 with Retry-After, and requests already in
flight, streams included, run to completion. When nothing is left (the server's own in-flight
counter and the engine's running + waiting are all 0), or `drain_timeout_s` has passed, uvicorn is
told to exit; its shutdown then stops the engine. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

from fleetserve.server.state import WorkerState

log = logging.getLogger("fleetserve.server")

POLL_S = 0.05
CANCEL_WAIT_S = 2.0


def outstanding(state: WorkerState) -> int:
    """Requests not yet finished: HTTP requests in flight plus what the engine still holds."""
    busy = state.in_flight
    engine = state.engine
    if engine is not None:
        try:
            stats = engine.stats()
            busy += int(getattr(stats, "running", 0) or 0) + int(getattr(stats, "waiting", 0) or 0)
        except Exception as exc:  # noqa: BLE001 (a stopped or failed engine holds nothing)
            log.debug("engine stats unavailable while draining: %s", exc)
    return busy


async def drain(state: WorkerState, timeout_s: float) -> bool:
    """Mark the worker draining and wait until nothing is outstanding; False if the timeout hit first
    (then the requests still in flight are cancelled, which aborts their engine requests)."""
    state.draining = True
    start = time.monotonic()
    busy = outstanding(state)
    log.info("draining: %d HTTP request(s) in flight, %d engine sequence(s) running or waiting; waiting up to "
             "%gs for them to finish", state.in_flight, busy - state.in_flight, timeout_s)
    while busy:
        if time.monotonic() - start >= timeout_s:
            log.warning("drain timeout (%gs) reached with %d HTTP request(s) still in flight; cancelling them",
                        timeout_s, state.in_flight)
            tasks = [t for t in state.request_tasks if not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=CANCEL_WAIT_S)
            return False
        await asyncio.sleep(POLL_S)
        busy = outstanding(state)
    log.info("drained in %.2fs; shutting down", time.monotonic() - start)
    return True


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of closing connections at once."""

    def __init__(self, config: uvicorn.Config, state: WorkerState, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the signal handler: only set flags and schedule work (no logging, no awaiting).
        # Unlike uvicorn's own handler, the signal is not recorded for re-raising, so the exit code is 0.
        if self.state.draining or self._loop is None or self.should_exit:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self.state.draining = True
        self._loop.call_soon_threadsafe(self.start_drain, sig)

    def start_drain(self, sig: int | None = None) -> None:
        """Begin draining (on the event loop); also callable without a signal."""
        if self._drain_task is not None:
            return
        if sig is not None:
            log.info("received %s", signal.Signals(sig).name)

        async def run() -> None:
            await drain(self.state, self.drain_timeout_s)
            self.should_exit = True

        self._drain_task = asyncio.ensure_future(run())


def serve_worker(make_app: Callable[[Callable[[], None]], object], state: WorkerState, host: str, port: int,
                 drain_timeout_s: float, before_serve: Callable[[], None] | None = None) -> None:
    """Runs a worker app until SIGTERM/SIGINT (drained: exit 0). `make_app(fail)` builds the app; the app
    calls `fail()` when its engine cannot serve (load failure, engine process death): the server then stops
    and the process exits 1, so the platform sees a failed replica rather than a silent one."""
    server: DrainingServer | None = None
    failed = False

    def fail() -> None:
        nonlocal failed
        failed = True
        if server is not None:
            server.should_exit = True

    app = make_app(fail)
    # log_config=None: uvicorn's own loggers propagate to ours (JSON, redaction, the log file);
    # access_log=False: RequestContextMiddleware writes the access log (with request ids).
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_config=None, log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=2), state, drain_timeout_s)
    if before_serve is not None:
        before_serve()
    asyncio.run(server.serve())
    if failed:
        raise SystemExit(1)
