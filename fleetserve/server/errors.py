"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the offending field named."""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("fleetserve.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed_request",
          503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


_ECHO_DEPTH = 16  # how deep error details echo nested input ("..." below that)


def renderable(value: Any, depth: int = 0) -> Any:
    """Error bodies echo parts of the request; keep them valid JSON: no NaN/Infinity (JSON has none), lone
    UTF-16 surrogates (`"\\ud800"` in a JSON string) written as the escape text rather than failing UTF-8, and
    deeply nested input cut short (echoing it would exhaust the recursion limit)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, (dict, list, tuple)) and depth >= _ECHO_DEPTH:
        return "..."
    if isinstance(value, dict):
        return {renderable(k, depth + 1): renderable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [renderable(v, depth + 1) for v in value]
    return value


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": renderable(message), "type": _TYPES.get(status, "server_error"),
                      "param": renderable(param), "code": code}}


# request fields whose values a validation error must never echo back (they would reach clients' logs)
SECRET_FIELDS = frozenset({"hf_token", "api_key", "api_keys", "token", "password", "secret"})


def without_secrets(value: Any, key: Any = None) -> Any:
    """An echoed input with secret fields' values (by name) and token-shaped strings replaced by ***."""
    from fleetserve.logs import REDACTED, redact

    if key in SECRET_FIELDS and value is not None:
        return REDACTED
    if isinstance(value, dict):
        return {k: without_secrets(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [without_secrets(v) for v in value]
    return redact(value) if isinstance(value, str) else value


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_surrogate(value: Any) -> bool:
    stack = [value]  # iterative: parsed JSON may nest as deep as the parser allows
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if any("\ud800" <= c <= "\udfff" for c in item):
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


async def require_valid_unicode(request: Request) -> None:
    """Route dependency: 400 for a JSON body whose strings hold lone UTF-16 surrogates (`"\\ud800"` without its
    pair). Python's JSON parser accepts them, but they are not Unicode: no tokenizer, database or UTF-8 encoder
    takes them, so they would otherwise surface as 500s deep inside the request."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    body = await request.body()
    if not _SURROGATE_ESCAPE.search(body):  # cheap: only \\uD800-\\uDFFF escapes can produce surrogates
        return
    try:
        data = await request.json()  # cached: FastAPI has parsed it already
    except (ValueError, RecursionError):
        return  # not JSON: the body's own validation says so
    if _has_surrogate(data):
        message = ("the request body contains a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair), "
                   "which is not valid Unicode; send text as UTF-8 or as complete surrogate pairs")
        if request.url.path.startswith("/v1/"):
            raise APIError(400, message, code="invalid_unicode")
        raise StarletteHTTPException(400, message)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def sse_error(message: str, status: int = 500) -> str:
    """A mid-stream failure: an error event the client can parse, followed by the caller's [DONE]."""
    return f"data: {json.dumps(error_body(status, message))}\n\n"


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body",)]
    # drop pydantic's union-branch tags like "str" / "list[str]"
    parts = [p for p in parts if not (p.startswith(("list[", "function-")) or p in ("str", "int"))]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if not request.url.path.startswith("/v1/"):
            detail = renderable(json.loads(json.dumps(errors, default=str)))
            for error in detail:
                if isinstance(error, dict) and "input" in error:  # e.g. a missing `name` echoes the whole body
                    field = next((x for x in reversed(error.get("loc") or []) if isinstance(x, str)), None)
                    error["input"] = without_secrets(error["input"], field)
            return JSONResponse({"detail": detail}, status_code=422)
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {first.get('msg')}")
        param = _param(tuple(first.get("loc", ())))
        msg = first.get("msg", "invalid value").removeprefix("Value error, ")
        return error_response(400, f"{param}: {msg}" if param else msg, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if request.url.path.startswith("/v1/"):
            return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))
        return JSONResponse({"detail": renderable(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal server error")
