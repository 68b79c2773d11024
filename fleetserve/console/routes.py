"""Serves the web console: `GET /` -> index.html, `/static/...` -> the files shipped in the package.

The files hold no data (everything comes from /api/v1 and /v1, which keep their auth), so they are
served without a key. No build step and no CDN: the JS is plain ES modules, the charting library is
vendored under `static/vendor/`.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent / "static"

# Browsers refuse ES modules served as text/plain; some systems' mime tables lack these entries.
for _type, _ext in (("text/javascript", ".js"), ("text/css", ".css"), ("image/svg+xml", ".svg"),
                    ("text/html", ".html"), ("text/markdown", ".md")):
    mimetypes.add_type(_type, _ext)

# The page loads only its own files and talks only to its own origin; no inline script anywhere.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: an upgraded package serves its new files at once
}


class ConsoleStatic(StaticFiles):
    """StaticFiles plus the console's headers."""

    async def get_response(self, path: str, scope: Scope):
        response = await super().get_response(path, scope)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response


def install_console(app: FastAPI) -> None:
    """Mount the console on `app`: `/` (the single page), `/static/...`, `/favicon.ico`."""

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=SECURITY_HEADERS)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml", headers=SECURITY_HEADERS)

    app.mount("/static", ConsoleStatic(directory=STATIC_DIR), name="console-static")
