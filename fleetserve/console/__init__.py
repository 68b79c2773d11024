"""The web console: a static single-page app (HTML/JS/CSS shipped in the package) served at `/` by
`fleetserve up`. It uses the same /api/v1 and /v1 the CLI and clients use; see `routes.py`."""

from fleetserve.console.routes import install_console

__all__ = ["install_console"]
