"""One Provider in front of several: each call goes to the provider the replica's deployment names.

The reconciler holds one provider; the platform gives it this router. Providers are built on first use,
so `fleetserve up` needs no Hathora token or Kubernetes config until a deployment asks for them. A
provider that cannot be built or cannot start a replica (missing credentials, an API error) yields a
replica that observe() reports as gone with the reason, so the failure shows as a failed start in the
deployment's events and status, exactly like a worker that crashed while loading.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from fleetserve.control.providers.base import Liveness, Provider
from fleetserve.control.spec import DeploymentSpec
from fleetserve.control.store import ReplicaRow, Store

log = logging.getLogger("fleetserve.control")


class ProviderRouter:
    name = "router"

    def __init__(self, store: Store, factories: dict[str, Callable[[], Provider]]):
        self.store = store
        self.factories = factories
        self.providers: dict[str, Provider] = {}
        self._owner: dict[str, str] = {}  # replica id -> provider name (known once started here)
        self._failed: dict[str, str] = {}  # replica id -> why its start failed

    def get(self, name: str) -> Provider:
        if name not in self.providers:
            if name not in self.factories:
                raise ValueError(f"unknown provider {name!r}; available: {', '.join(sorted(self.factories))}")
            self.providers[name] = self.factories[name]()
        return self.providers[name]

    def _for(self, r: ReplicaRow) -> Provider:
        name = self._owner.get(r.id)
        if name is None:
            d = self.store.get(r.deployment)
            name = d.spec.provider if d is not None else "local"
            self._owner[r.id] = name
        return self.get(name)

    async def start(self, spec: DeploymentSpec, replica_id: str, generation: int) -> ReplicaRow:
        self._owner[replica_id] = spec.provider
        try:
            return await self.get(spec.provider).start(spec, replica_id, generation)
        except Exception as exc:
            log.warning("provider %s could not start replica %s: %s", spec.provider, replica_id, exc)
            self._failed[replica_id] = f"{spec.provider} provider: {exc}"
            return ReplicaRow(replica_id, spec.name, generation, None, None, None, "starting", time.time(), None)

    async def observe(self, r: ReplicaRow) -> Liveness:
        if r.id in self._failed:
            return Liveness(False, None, self._failed[r.id])
        where = r.log_path
        live = await self._for(r).observe(r)
        if r.log_path != where and live.alive:  # the provider learnt where the replica lives: keep it
            self.store.put_replica(r)
        return live

    async def ready(self, r: ReplicaRow, client: httpx.AsyncClient) -> bool:
        if r.id in self._failed:
            return False
        return await self._for(r).ready(r, client)

    async def stop(self, r: ReplicaRow, force: bool = False) -> None:
        if r.id in self._failed:
            return
        await self._for(r).stop(r, force)

    async def release(self, r: ReplicaRow) -> None:
        if self._failed.pop(r.id, None) is None:
            await self._for(r).release(r)
        self._owner.pop(r.id, None)

    async def logs(self, r: ReplicaRow, tail: int) -> list[str]:
        if r.id in self._failed:
            return [f"(replica failed to start: {self._failed[r.id]})"]
        return await self._for(r).logs(r, tail)

    def log_file(self, r: ReplicaRow) -> Path | None:
        if r.id in self._failed:
            return None
        return self._for(r).log_file(r)

    async def aclose(self) -> None:
        for provider in self.providers.values():
            close = getattr(provider, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    log.exception("closing provider %s failed", provider.name)
