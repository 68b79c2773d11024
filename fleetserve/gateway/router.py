"""The gateway: routes OpenAI requests to a deployment's ready replicas and streams the answer back.

Policy (the SGLang router's cache-aware idea, simplified): requests whose prompts start alike
prefer the same replica (rendezvous hashing on a prompt prefix), unless that replica already has
`balance_slack` more requests in flight than the least loaded one; then least-outstanding wins.
A connection failure before the first byte ejects the replica briefly and retries another.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fleetserve.server.errors import error_response

log = logging.getLogger("fleetserve.gateway")

PREFIX_CHARS = 256  # how much of a prompt decides affinity
EJECT_S = 5.0
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "host"}


@dataclass
class ReplicaSet:
    urls: list[str] = field(default_factory=list)
    in_flight: dict[str, int] = field(default_factory=dict)
    ejected_until: dict[str, float] = field(default_factory=dict)

    def candidates(self) -> list[str]:
        now = time.monotonic()
        alive = [u for u in self.urls if self.ejected_until.get(u, 0) <= now]
        return alive or list(self.urls)

    def pick(self, affinity_key: str | None, exclude: set[str], balance_slack: int = 2) -> str | None:
        urls = [u for u in self.candidates() if u not in exclude]
        if not urls:
            return None
        least = min(self.in_flight.get(u, 0) for u in urls)
        if affinity_key:
            ranked = sorted(urls, key=lambda u: hashlib.blake2b(f"{affinity_key}|{u}".encode(),
                                                                 digest_size=8).digest(), reverse=True)
            preferred = ranked[0]
            if self.in_flight.get(preferred, 0) <= least + balance_slack:
                return preferred
        return min(urls, key=lambda u: (self.in_flight.get(u, 0), u))


@dataclass
class DeploymentTraffic:
    """The gateway's own per-deployment counters (feeds /api/v1/deployments/{name}/metrics)."""

    requests: int = 0
    errors: int = 0
    in_flight: int = 0
    ttfb: deque = field(default_factory=lambda: deque(maxlen=2048))  # (monotonic ts, seconds)
    cold_starts: deque = field(default_factory=lambda: deque(maxlen=256))  # (wall ts, seconds held)
    last_request: float = 0.0


class Gateway:
    def __init__(self, internal_key: str | None = None, hold_timeout_s: float = 120.0,
                 holdable=lambda name: False, on_demand=lambda name: None):
        self.sets: dict[str, ReplicaSet] = {}
        self.traffic: dict[str, DeploymentTraffic] = {}
        self.pending: dict[str, int] = {}  # requests held while a deployment starts from zero
        self.internal_key = internal_key
        self.hold_timeout_s = hold_timeout_s
        self.holdable, self.on_demand = holdable, on_demand
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0),
                                        limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256))

    def update(self, deployment: str, urls: list[str]) -> None:
        rs = self.sets.setdefault(deployment, ReplicaSet())
        rs.urls = list(urls)
        if not urls and deployment not in self.traffic:
            self.sets.pop(deployment, None)

    def forget(self, deployment: str) -> None:
        self.sets.pop(deployment, None)
        self.traffic.pop(deployment, None)

    async def close(self) -> None:
        await self.client.aclose()

    async def forward(self, deployment: str, path: str, request: Request, body: bytes,
                      affinity_key: str | None) -> Response:
        traffic = self.traffic.setdefault(deployment, DeploymentTraffic())
        traffic.requests += 1
        traffic.last_request = time.time()
        rs = self.sets.get(deployment)
        if (rs is None or not rs.urls) and self.holdable(deployment):
            rs = await self._hold(deployment, traffic)
        if rs is None or not rs.urls:
            traffic.errors += 1
            return error_response(503, f"deployment '{deployment}' has no ready replica yet; retry shortly",
                                  headers={"Retry-After": "5"})
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS | {"authorization"}}
        headers["x-request-id"] = rid
        if self.internal_key:
            headers["authorization"] = f"Bearer {self.internal_key}"
        tried: set[str] = set()
        start = time.monotonic()
        while True:
            url = rs.pick(affinity_key, tried)
            if url is None:
                traffic.errors += 1
                return error_response(503, f"no replica of '{deployment}' could be reached",
                                      headers={"Retry-After": "2", "x-request-id": rid})
            tried.add(url)
            req = self.client.build_request(request.method, f"{url}{path}", content=body, headers=headers,
                                            params=request.query_params)
            rs.in_flight[url] = rs.in_flight.get(url, 0) + 1
            traffic.in_flight += 1
            try:
                upstream = await self.client.send(req, stream=True)
            # ReadError/WriteError: a kept-alive connection to a replica that died (SIGKILL, OOM) fails on
            # first use, before any byte of an answer: that replica cannot be reached either
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
                    httpx.WriteError) as exc:
                rs.in_flight[url] -= 1
                traffic.in_flight -= 1
                rs.ejected_until[url] = time.monotonic() + EJECT_S
                log.warning("replica %s unreachable (%s); retrying elsewhere", url, type(exc).__name__)
                continue
            traffic.ttfb.append((time.monotonic(), time.monotonic() - start))
            if upstream.status_code >= 500:
                traffic.errors += 1
            return StreamingResponse(self._relay(upstream, rs, url, traffic), status_code=upstream.status_code,
                                     headers={k: v for k, v in upstream.headers.items()
                                              if k.lower() not in HOP_HEADERS | {"content-encoding"}},
                                     media_type=upstream.headers.get("content-type"))

    async def _hold(self, deployment: str, traffic: DeploymentTraffic) -> ReplicaSet | None:
        """Scale from zero / cold start: keep the request until a replica is ready (bounded)."""
        self.pending[deployment] = self.pending.get(deployment, 0) + 1
        start = time.monotonic()
        try:
            self.on_demand(deployment)
            while time.monotonic() - start < self.hold_timeout_s:
                rs = self.sets.get(deployment)
                if rs is not None and rs.urls:
                    traffic.cold_starts.append((time.time(), time.monotonic() - start))
                    return rs
                await asyncio.sleep(0.1)
            return None
        finally:
            self.pending[deployment] -= 1

    async def _relay(self, upstream: httpx.Response, rs: ReplicaSet, url: str, traffic: DeploymentTraffic):
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:  # the replica died mid-stream: end this stream cleanly
            err = {"error": {"message": f"the replica serving this request failed: {type(exc).__name__}",
                             "type": "server_error", "param": None, "code": "replica_failed"}}
            yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()
        finally:
            await upstream.aclose()
            rs.in_flight[url] = max(0, rs.in_flight.get(url, 1) - 1)
            traffic.in_flight = max(0, traffic.in_flight - 1)


def affinity_key(payload: dict) -> str | None:
    if isinstance(payload.get("messages"), list):
        return json.dumps(payload["messages"], sort_keys=True)[:PREFIX_CHARS]
    prompt = payload.get("prompt")
    if prompt is not None:
        return json.dumps(prompt)[:PREFIX_CHARS]
    return None


def make_router(gateway: Gateway, deployments) -> APIRouter:
    """`deployments()` returns the names known to the control plane (for 404 vs 503)."""
    router = APIRouter(tags=["gateway"])

    async def _route(request: Request, path: str) -> Response:
        body = await request.body()
        try:
            payload = json.loads(body or b"{}")
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser allows
            return error_response(400, "the request body is not valid JSON")
        if not isinstance(payload, dict):
            return error_response(400, "the request body must be a JSON object")
        names = deployments()
        model = payload.get("model")
        if model is None and len(names) == 1:
            model = names[0]
        if model not in names:
            return error_response(404, f"the model '{model}' does not exist; deployments: {sorted(names)}",
                                  "model", "model_not_found")
        return await gateway.forward(model, path, request, body, affinity_key(payload))

    @router.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _route(request, "/v1/chat/completions")

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _route(request, "/v1/completions")

    @router.get("/v1/models")
    async def models() -> JSONResponse:
        now = int(time.time())
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": now, "owned_by": "fleetserve"} for n in deployments()]})

    @router.get("/deployments/{name}/{path:path}", operation_id="deployment_passthrough_get")
    @router.post("/deployments/{name}/{path:path}", operation_id="deployment_passthrough_post")
    async def passthrough(name: str, path: str, request: Request) -> Response:
        if name not in deployments():
            return error_response(404, f"no deployment named '{name}'")
        body = await request.body()
        try:
            key = affinity_key(json.loads(body)) if body else None
        except (ValueError, RecursionError, AttributeError):
            key = None
        # `path` arrives %-decoded: encode it again, so `?`, `#` or control characters in it stay part of the
        # replica's path (not a query string, not an invalid URL)
        return await gateway.forward(name, "/" + quote(path, safe="/:@!$&'()*+,;=~"), request, body,
                                     key if isinstance(key, str) else None)

    return router
