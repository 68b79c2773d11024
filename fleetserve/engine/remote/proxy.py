"""Forward an HTTP request to the engine and stream its answer back untouched (SSE included)."""

from __future__ import annotations

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

# Headers that describe one connection, not the message (RFC 9110 7.6.1), plus those httpx recomputes.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "host", "content-length"})
# Not forwarded upstream: the client's key is for fleetserve, not the engine.
DROP_UPSTREAM = HOP_BY_HOP | {"authorization", "accept-encoding"}


def new_client(timeout_s: float = 600.0) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=64)
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0), limits=limits)


async def forward(client: httpx.AsyncClient, base_url: str, request: Request, path: str | None = None) -> Response:
    """Send `request` to `base_url` + its path and query; stream the response body as it arrives."""
    url = base_url.rstrip("/") + (path if path is not None else request.url.path)
    if request.url.query:
        url += "?" + request.url.query
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in DROP_UPSTREAM]
    body = await request.body()
    upstream_req = client.build_request(request.method, url, headers=headers, content=body)
    try:
        upstream = await client.send(upstream_req, stream=True)
    except httpx.HTTPError as exc:
        return JSONResponse({"error": {"message": f"the engine at {base_url} did not answer: {type(exc).__name__}",
                                       "type": "engine_unavailable", "param": None, "code": "engine_unavailable"}},
                            status_code=502)
    out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
    return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code, headers=out_headers,
                             background=BackgroundTask(upstream.aclose))
