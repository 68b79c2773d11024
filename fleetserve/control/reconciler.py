"""The reconcile loop: drive each deployment's replicas toward its desired state.

Every pass observes (is each replica alive? ready?), then acts one step (start a missing replica,
replace a dead one, retire a surplus or outdated one after draining it), then derives the status.
Crash recovery, scaling, rolling updates and deletion are all the same code path.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

import httpx

from fleetserve.control.store import DeploymentRow, ReplicaRow, Store

log = logging.getLogger("fleetserve.control")

START_TIMEOUT_S = 600.0  # a replica not ready by then is replaced
DRAIN_TIMEOUT_S = 30.0
BACKOFF_BASE_S, BACKOFF_MAX_S = 2.0, 120.0
FAILED_AFTER = 3  # consecutive failed starts before the deployment shows `failed`


@dataclass
class Health:
    """What the reconciler remembers between passes about one deployment (not persisted)."""

    failures: int = 0
    retry_at: float = 0.0
    last_failure: str = ""
    draining: dict[str, float] = field(default_factory=dict)  # replica id -> drain deadline
    # replicas seen ready at least once: one that turns unready (a slow probe, a crash under way) and then exits
    # is an exit to replace at once, not a failed start, and the start timeout no longer applies to it
    was_ready: set[str] = field(default_factory=set)


class Reconciler:
    def __init__(self, store: Store, provider, on_change=None, interval_s: float = 1.0):
        self.store, self.provider = store, provider
        self.interval_s = interval_s
        self.on_change = on_change  # called with (deployment name, ready replica urls)
        self.health: dict[str, Health] = {}
        self._client = httpx.AsyncClient()
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self.desired_override: dict[str, int] = {}  # set by the autoscaler later; min replicas otherwise

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def poke(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.reconcile_all()
            except Exception:  # one bad pass must not stop the loop
                log.exception("reconcile pass failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except TimeoutError:
                pass
            self._wake.clear()

    async def stop(self, stop_replicas: bool = True) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if stop_replicas:
            rows = [r for d in self.store.list() for r in self.store.replicas(d.name)]
            for r in rows:
                await self.provider.stop(r)
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while time.monotonic() < deadline and any([(await self.provider.observe(r)).alive for r in rows]):
                await asyncio.sleep(0.1)
            for r in rows:
                await self.provider.stop(r, force=True)
                await self.provider.release(r)
                r.status = "stopped"
                self.store.put_replica(r)
        await self._client.aclose()

    def desired(self, d: DeploymentRow) -> int:
        return self.desired_override.get(d.name, d.spec.replicas.min)

    async def reconcile_all(self) -> None:
        for d in self.store.list():
            await self.reconcile(d)

    async def reconcile(self, d: DeploymentRow) -> None:
        h = self.health.setdefault(d.name, Health())
        replicas = self.store.replicas(d.name)
        now = time.time()
        await self._observe(d, h, replicas, now)
        replicas = self.store.replicas(d.name)
        if d.deleting:
            await self._delete(d, h, replicas)
            return
        live = [r for r in replicas if r.id not in h.draining]
        current = [r for r in live if r.generation == d.generation]
        outdated = [r for r in live if r.generation != d.generation]
        ready_current = [r for r in current if r.status == "ready"]
        want = self.desired(d)
        # scale up / replace: one start per pass, respecting backoff after failures
        if len(current) < want and now >= h.retry_at:
            rid = f"{d.name}-{uuid.uuid4().hex[:6]}"
            r = await self.provider.start(d.spec, rid, d.generation)
            self.store.put_replica(r)
            self.store.event(d.name, "ReplicaStarting", f"starting replica {rid} on port {r.port} "
                                                        f"({len(current) + 1}/{want})")
        # rolling update: retire an old replica once a new one is ready to take its place
        elif outdated and (ready_current or want == 0):
            await self._drain(d, h, outdated[0], "replaced by the updated spec")
        # scale down: retire the newest surplus replica (starting ones first)
        elif len(current) > want:
            victim = sorted(current, key=lambda r: (r.status == "ready", r.started_at or 0))[0]
            await self._drain(d, h, victim, f"scaling down to {want}")
        self._set_status(d, h, want)
        self._publish(d.name)

    async def _observe(self, d: DeploymentRow, h: Health, replicas: list[ReplicaRow], now: float) -> None:
        for r in replicas:
            if r.status == "draining" and r.id not in h.draining:  # drain begun by an earlier control plane
                h.draining[r.id] = now + DRAIN_TIMEOUT_S
                await self.provider.stop(r)
            if r.id in h.draining:
                if not (await self.provider.observe(r)).alive or now > h.draining[r.id]:
                    await self.provider.stop(r, force=True)
                    await self.provider.release(r)
                    self.store.delete_replica(r.id)
                    h.draining.pop(r.id)
                    h.was_ready.discard(r.id)
                    self.store.event(d.name, "ReplicaStopped", f"replica {r.id} stopped")
                continue
            if r.status == "ready":
                h.was_ready.add(r.id)
            live = await self.provider.observe(r)
            if not live.alive:
                code, reason = live.exit_code, live.reason
                was = r.status
                await self.provider.release(r)
                self.store.delete_replica(r.id)
                if was == "starting" and r.id not in h.was_ready:
                    self._failed_start(d, h, r, reason)
                else:
                    self.store.event(d.name, "ReplicaExited",
                                     f"replica {r.id} exited (code {code}); replacing it: {reason}")
                h.was_ready.discard(r.id)
                continue
            if r.status == "starting":
                if await self.provider.ready(r, self._client):
                    r.status = "ready"
                    self.store.put_replica(r)
                    h.failures, h.last_failure = 0, ""
                    self.store.event(d.name, "ReplicaReady", f"replica {r.id} is ready at {r.url}")
                elif r.id not in h.was_ready and now - (r.started_at or now) > START_TIMEOUT_S:
                    await self.provider.stop(r, force=True)
                    await self.provider.release(r)
                    self.store.delete_replica(r.id)
                    self._failed_start(d, h, r, f"not ready after {START_TIMEOUT_S:.0f}s")
            elif r.status == "ready" and not await self.provider.ready(r, self._client):
                r.status = "starting"  # alive but not ready (e.g. draining): out of routing until ready
                self.store.put_replica(r)

    def _failed_start(self, d: DeploymentRow, h: Health, r: ReplicaRow, reason: str) -> None:
        h.failures += 1
        h.last_failure = reason
        delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (h.failures - 1))
        h.retry_at = time.time() + delay
        self.store.event(d.name, "ReplicaFailed",
                         f"replica {r.id} failed to start ({h.failures} in a row): {reason}; retrying in {delay:.0f}s")

    async def _drain(self, d: DeploymentRow, h: Health, r: ReplicaRow, why: str) -> None:
        r.status = "draining"
        self.store.put_replica(r)
        h.draining[r.id] = time.time() + DRAIN_TIMEOUT_S
        self._publish(d.name)  # out of routing first, then drain: no new request reaches it
        await self.provider.stop(r)
        self.store.event(d.name, "ReplicaDraining", f"draining replica {r.id}: {why}")

    async def _delete(self, d: DeploymentRow, h: Health, replicas: list[ReplicaRow]) -> None:
        for r in replicas:
            if r.id not in h.draining:
                await self._drain(d, h, r, "deployment deleted")
        if not replicas:
            self.store.remove(d.name)
            self.health.pop(d.name, None)
            self._publish(d.name)

    def _set_status(self, d: DeploymentRow, h: Health, want: int) -> None:
        reps = [r for r in self.store.replicas(d.name) if r.id not in h.draining]
        ready = sum(r.status == "ready" for r in reps)
        outdated = any(r.generation != d.generation for r in reps)
        if h.failures >= FAILED_AFTER and ready == 0:
            status, msg = "failed", f"{h.failures} failed starts; last: {h.last_failure}"
        elif want == 0 and not reps:
            status, msg = "scaled_to_zero", "no replicas (scaled to zero)"
        elif outdated:
            status, msg = "updating", f"rolling update: {ready} ready"
        elif ready == 0:
            status = "starting"
            msg = f"retrying after failure: {h.last_failure}" if h.failures else "loading the model"
        elif ready != want or len(reps) != want:
            status, msg = "scaling", f"{ready}/{want} replicas ready"
        else:
            status, msg = "running", f"{ready}/{want} replicas ready"
        if self.store.set_status(d.name, status, msg):
            self.store.event(d.name, "Status", f"{status}: {msg}")

    def _publish(self, name: str) -> None:
        if self.on_change:
            ready = [r.url for r in self.store.replicas(name) if r.status == "ready"]
            self.on_change(name, ready)
