"""Route guards as FastAPI dependencies: bearer API keys, and refusing new work while draining.

Routers that serve inference or private data include them, e.g.::

    app.include_router(router, dependencies=INFERENCE_DEPENDENCIES)   # /v1, /generate, /loglikelihood, ...
    @router.get("/logs", dependencies=[Depends(require_api_key)])

With no key configured nothing requires one. Health and readiness never do. Errors are raised as
HTTP exceptions, which `errors.py` turns into OpenAI's error shape on /v1 and FastAPI's elsewhere.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from fleetserve.server.errors import APIError, require_valid_unicode
from fleetserve.server.state import get_state

DRAIN_RETRY_AFTER_S = 5

_bearer = HTTPBearer(auto_error=False, description="An API key of this worker (--api-key / FLEETSERVE_API_KEY).")


def deny(request: Request, status: int, message: str, code: str | None = None,
         headers: dict[str, str] | None = None) -> Exception:
    """The error to raise: OpenAI's shape (with `code`) on /v1, FastAPI's `{"detail"}` elsewhere."""
    if request.url.path.startswith("/v1/"):
        return APIError(status, message, code=code, headers=headers)
    return HTTPException(status, message, headers=headers)


def key_matches(presented: str, keys: list[bytes]) -> bool:
    """Constant-time comparison against every configured key (no early exit on a match)."""
    token = presented.encode("utf-8", errors="surrogatepass")
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(token, key)
    return ok


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def require_api_key(request: Request, credentials: Credentials) -> None:
    """401 unless `Authorization: Bearer <key>` carries a configured key; a no-op when none is configured."""
    keys = [k.get_secret_value().encode("utf-8") for k in get_state(request).config.api_keys]
    if not keys:
        return
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or not credentials.credentials:
        raise deny(request, 401, "missing API key: send the header 'Authorization: Bearer <key>' with one of "
                                 "this server's keys (--api-key / FLEETSERVE_API_KEY)", "missing_api_key", challenge)
    if not key_matches(credentials.credentials, keys):
        raise deny(request, 401, "invalid API key: the bearer token is not one of this server's keys "
                                 "(--api-key / FLEETSERVE_API_KEY)", "invalid_api_key", challenge)


async def require_metrics_access(request: Request, credentials: Credentials) -> None:
    """/metrics is open unless `metrics_auth` is set; then it needs a key like /v1 does."""
    if get_state(request).config.metrics_auth:
        await require_api_key(request, credentials)


async def require_accepting(request: Request) -> None:
    """503 with Retry-After for new work while the worker drains (reads stay open: GET /v1/models)."""
    if get_state(request).draining and request.method not in ("GET", "HEAD", "OPTIONS"):
        raise deny(request, 503, "this worker is shutting down and takes no new requests; retry on another "
                                 "replica or after it restarts", "draining",
                   {"Retry-After": str(DRAIN_RETRY_AFTER_S)})


# What every inference router (/v1, /generate, /loglikelihood, /tokenize, /detokenize) should include.
INFERENCE_DEPENDENCIES = [Depends(require_api_key), Depends(require_accepting), Depends(require_valid_unicode)]
