"""ASGI middleware of the worker: request ids, timing, access log, request metrics, body size limit.

Plain ASGI (not BaseHTTPMiddleware) so streaming responses pass through untouched and the request
id context variable is visible to everything that runs for the request, streams included.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleetserve.logs import request_id_var
from fleetserve.server.errors import error_body
from fleetserve.server.state import WorkerState

access_log = logging.getLogger("fleetserve.access")

REQUEST_ID_HEADER = "X-Request-ID"
PROCESS_TIME_HEADER = "X-Process-Time"
# A caller's id is kept if it looks like an id (what gateways and tracing tools send); anything else
# (too long, spaces, control characters that could forge log lines) is replaced by a fresh one.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
# Probes and scrapes: not counted as in-flight work (so they never hold up a drain), logged at debug.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/health", "/metrics"})


def new_request_id() -> str:
    return uuid.uuid4().hex


def _route_label(scope: Scope) -> str:
    """The route template (bounded label values); found by matching when routing never ran (413, CORS)."""
    route = scope.get("route")
    if route is None:
        router = getattr(scope.get("app"), "router", None)
        for candidate in _leaf_routes(getattr(router, "routes", ())):
            match, _ = candidate.matches(scope)
            if match != Match.NONE:
                route = candidate
                break
    path = getattr(route, "path", None)
    return path or "unmatched"


def _leaf_routes(routes):
    """Routes, with FastAPI's included-router wrappers opened (our routers are included without a prefix)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _leaf_routes(inner.routes)
        elif hasattr(route, "matches") and getattr(route, "path", None):
            yield route


class RequestContextMiddleware:
    """`X-Request-ID` in (or generated) and out, `X-Process-Time`, one access log line, request counts."""

    def __init__(self, app: ASGIApp, state: WorkerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER)
        rid = incoming if incoming and _VALID_REQUEST_ID.fullmatch(incoming) else new_request_id()
        token = request_id_var.set(rid)
        path = scope.get("path", "")
        quiet = path in QUIET_PATHS
        status = 500  # if the app fails before it starts a response
        task = asyncio.current_task()
        if not quiet:
            self.state.in_flight += 1
            if task is not None:
                self.state.request_tasks.add(task)

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = rid
                headers[PROCESS_TIME_HEADER] = f"{time.perf_counter() - start:.6f}"
            await send(message)

        cut_off = False
        try:
            await self.app(scope, receive, send_with_headers)
        except asyncio.CancelledError:
            if not self.state.draining:
                raise
            cut_off = True  # the drain timed out and cancelled it: end quietly, the connection closes
        finally:
            duration = time.perf_counter() - start
            if not quiet:
                self.state.in_flight -= 1
                self.state.request_tasks.discard(task)
            self.state.metrics.observe_request(_route_label(scope), status)
            method = scope.get("method", "")
            # The path only: never the query string, the body or any header (Authorization, cookies).
            level = logging.WARNING if cut_off else logging.DEBUG if quiet else logging.INFO
            access_log.log(level, "%s %s %d %.3fs%s", method, path, status, duration,
                           " (cut off by the drain timeout)" if cut_off else "",
                           extra={"method": method, "path": path, "status": status,
                                  "duration_s": round(duration, 6), "request_id": rid})
            request_id_var.reset(token)


class BodyLimitMiddleware:
    """413 for a request body over `max_bytes`: from Content-Length before reading anything, and while
    reading a body without one (chunked), so no more than `max_bytes` is ever held in memory."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            await self._reject(scope, send, f"the request body is {int(length)} bytes")
            return
        # Read the body here (bounded), then hand it on. FastAPI reads whole bodies anyway.
        chunks: list[bytes] = []
        total = 0
        first_other: Message | None = None
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: pass it on after what we have
                first_other = message
                break
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await self._reject(scope, send, f"the request body is over {self.max_bytes} bytes")
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed, first_other
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            if first_other is not None:
                message, first_other = first_other, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, send: Send, what: str) -> None:
        message = (f"{what}; this server accepts request bodies of at most {self.max_bytes} bytes "
                   "(--max-body-bytes)")
        if scope.get("path", "").startswith("/v1/"):
            body = error_body(413, message, None, "request_too_large")
        else:
            body = {"detail": message}
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


def add_cors(app, origins: list[str]) -> None:
    """CORS for the configured browser origins (nothing when there are none): the worker's one CORS policy."""
    if not origins:
        return
    from fastapi.middleware.cors import CORSMiddleware

    app.add_middleware(CORSMiddleware, allow_origins=origins, allow_credentials=False,
                       allow_methods=["GET", "POST", "OPTIONS"],
                       allow_headers=["Authorization", "Content-Type", REQUEST_ID_HEADER],
                       expose_headers=[REQUEST_ID_HEADER, PROCESS_TIME_HEADER, "Retry-After"], max_age=600)
