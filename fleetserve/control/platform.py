"""`fleetserve up`: one process serving the control API (/api/v1), the gateway (/v1) and, later,
the console (/). State lives in FLEETSERVE_HOME: the SQLite database, the secret key, replica logs."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fleetserve import __version__
from fleetserve.config import DEFAULT_MAX_BODY_BYTES
from fleetserve.console import install_console
from fleetserve.control import api
from fleetserve.control.autoscaler import Autoscaler
from fleetserve.control.metrics import MetricsCollector
from fleetserve.control.providers.hathora import HathoraProvider
from fleetserve.control.providers.kubernetes import KubernetesProvider
from fleetserve.control.providers.local import LocalProvider
from fleetserve.control.providers.router import ProviderRouter
from fleetserve.control.reconciler import Reconciler
from fleetserve.control.secrets import SecretBox
from fleetserve.control.spec import DeploymentSpec
from fleetserve.control.store import Store
from fleetserve.gateway.router import Gateway, make_router
from fleetserve.server.auth import deny
from fleetserve.server.errors import install_error_handlers
from fleetserve.server.middleware import BodyLimitMiddleware

log = logging.getLogger("fleetserve.control")

_bearer = HTTPBearer(auto_error=False, description="The platform's admin key (--api-key / FLEETSERVE_API_KEY).")


class Platform:
    def __init__(self, home: Path, base_url: str, api_keys: list[str] | None = None,
                 default_deployment: bool = True, reconcile_interval_s: float = 1.0,
                 metrics_interval_s: float = 2.0, providers: dict | None = None):
        self.home = home
        self.base_url = base_url
        self.api_keys = [k.encode() for k in api_keys or []]
        secrets = SecretBox(home / "secret.key")
        self.store = Store(home / "fleetserve.db", secrets)
        # Replicas accept only the gateway (and whoever holds this key): they never see users' keys.
        internal_key = secrets.internal_key(home / "internal.key")
        # One provider per deployment's `spec.provider`, built on first use (a cloud's credentials are
        # needed only once a deployment asks for it); the reconciler sees them through one router.
        self.provider = ProviderRouter(self.store, {
            "local": lambda: LocalProvider(home, internal_key=internal_key),
            "hathora": lambda: HathoraProvider.from_env(home, internal_key=internal_key),
            "kubernetes": lambda: KubernetesProvider(internal_key=internal_key),
            **(providers or {}),
        })
        self.gateway = Gateway(internal_key=internal_key, holdable=self._holdable, on_demand=self._on_demand)
        self.reconciler = Reconciler(self.store, self.provider, on_change=self.gateway.update,
                                     interval_s=reconcile_interval_s)
        self.metrics = MetricsCollector(metrics_interval_s)
        self.autoscaler = Autoscaler(self.store, self.reconciler, self.gateway, self.metrics)
        self.default_deployment = default_deployment
        self._tasks: list[asyncio.Task] = []

    def _holdable(self, name: str) -> bool:
        d = self.store.get(name)
        return d is not None and not d.deleting and d.status != "failed"

    def _on_demand(self, name: str) -> None:
        self.autoscaler.step(time.time())

    def deployment_names(self) -> list[str]:
        return [d.name for d in self.store.list() if not d.deleting]

    async def start(self) -> None:
        if self.default_deployment and self.store.get("default") is None:
            self.store.create(DeploymentSpec(name="default", model="default"))
            self.store.event("default", "Created", "the embedded default model, created by `fleetserve up`")
        self.reconciler.start()
        self._tasks = [asyncio.create_task(self._collect()), asyncio.create_task(self._autoscale())]

    async def stop(self, stop_replicas: bool = True) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.reconciler.stop(stop_replicas)
        await self.provider.aclose()
        await self.gateway.close()
        await self.metrics.close()

    async def _autoscale(self) -> None:
        while True:
            try:
                self.autoscaler.step(time.time())
            except Exception:
                log.exception("autoscaler step failed")
            await asyncio.sleep(1.0)

    async def _collect(self) -> None:
        while True:
            for d in self.store.list():
                ready = [r.url for r in self.store.replicas(d.name) if r.status == "ready"]
                traffic = self.gateway.traffic.get(d.name)
                ttfb = [s for _, s in traffic.ttfb] if traffic else []
                try:
                    point = await self.metrics.sample(d.name, ready, traffic.requests if traffic else 0, ttfb)
                    cold = [held for ts, held in (traffic.cold_starts if traffic else ()) if ts > point["ts"] - 60]
                    point["cold_start_ms"] = round(max(cold) * 1000, 1) if cold else None
                    point["desired_replicas"] = self.reconciler.desired(d)
                    point["in_flight"] = (traffic.in_flight if traffic else 0) + self.gateway.pending.get(d.name, 0)
                except Exception:
                    log.exception("metrics sample for %s failed", d.name)
            for name in set(self.metrics.series) - {d.name for d in self.store.list()}:
                self.metrics.forget(name)
            await asyncio.sleep(self.metrics.interval_s)


def create_platform_app(p: Platform) -> FastAPI:
    async def require_admin(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)):
        if not p.api_keys:
            return
        token = (credentials.credentials if credentials else "").encode()
        if not any([hmac.compare_digest(token, k) for k in p.api_keys]):  # noqa: C419 (check every key)
            raise deny(request, 401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                       "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await p.start()
        yield
        await p.stop(stop_replicas=not getattr(app.state, "keep_replicas", False))

    app = FastAPI(title="fleetserve", version=__version__, lifespan=lifespan,
                  description="fleetserve control plane (/api/v1) and gateway (/v1).")
    app.state.platform = p
    install_error_handlers(app)
    # the gateway buffers each body (to route by `model`) before a worker's own limit applies: 413 here too
    app.add_middleware(BodyLimitMiddleware, max_bytes=DEFAULT_MAX_BODY_BYTES)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        return {"status": "ok"}

    app.include_router(api.router, dependencies=[Depends(require_admin)])
    app.include_router(make_router(p.gateway, p.deployment_names), dependencies=[Depends(require_admin)])
    install_console(app)  # `/` and `/static`: no data in them, so no key (the API calls they make need one)
    return app
