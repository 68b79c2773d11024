"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the offending field named."""

from __future__ import annotations

import json
import logging

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


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


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
            return JSONResponse({"detail": json.loads(json.dumps(errors, default=str))}, status_code=422)
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
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal server error")
