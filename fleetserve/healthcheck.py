"""`python -m fleetserve.healthcheck [PATH]`: exit 0 when this machine's worker answers PATH (default /readyz)
with 200, else 1 with one line saying why. The container images' HEALTHCHECK runs it.

The address comes from the same configuration `fleetserve serve` reads (command-line flags aside): the env
(FLEETSERVE_PORT, PORT, HATHORA_DEFAULT_PORT, DEPLOYMENT_CONFIG_JSON, ...), so the check follows the port the
worker really uses. A wildcard host (0.0.0.0, ::) is reached through loopback. Light: no torch, no server.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

TIMEOUT_S = 5.0


def target_url(path: str = "/readyz", env=None) -> str:
    from fleetserve.config import load_serve_config

    cfg, _ = load_serve_config({}, env=env)
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(cfg.host, cfg.host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{cfg.port}{path if path.startswith('/') else '/' + path}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else "/readyz"
    try:
        url = target_url(path)
    except ValueError as exc:  # ConfigError: the worker cannot be running with this configuration either
        print(f"unhealthy: invalid configuration: {exc}", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:  # noqa: S310 (a loopback http URL)
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
