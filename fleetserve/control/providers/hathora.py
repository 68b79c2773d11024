"""Hathora provider: each replica is one Hathora room (one process, `roomsPerProcess: 1`) in the spec's region.

Start = make sure the app, a registry build of the spec's image and a deployment carrying the worker's
configuration exist (both reused while the image and the non-secret env are unchanged), then create a
room whose id is the replica id. The room's URL comes from its connection info; it is ready when
`/readyz` answers 200 through that URL. Status comes from the room's process; drain = stop the process
(Hathora sends SIGTERM: the worker drains and exits), then the room is destroyed. Logs come from
Hathora's logs API.

The container is `fleetserve serve` with no arguments: everything it needs is in the deployment's env
(`DEPLOYMENT_CONFIG_JSON`, `FLEETSERVE_SERVED_MODEL_NAME`, the platform's internal key) and the HF token
travels only as the separate env entry `HF_TOKEN` (never in tags, room config, logs or the database).

Hathora terminates TLS at its edge (`transportType: "tls"`), so replica URLs are `https://host:port`.
When `HATHORA_API_URL` points at a loopback address (a local fake of the API, as the tests run) the
rooms are plain local processes without a TLS edge, so the URL is `http://host:port` instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

from fleetserve.control.providers.base import Liveness
from fleetserve.control.providers.hathora_client import (
    REGIONS,
    DeploymentConfigV3,
    EnvVar,
    HathoraClient,
    HathoraError,
    HathoraNotFound,
    RoomConnection,
)
from fleetserve.control.providers.images import DEFAULT_IMAGE, default_image
from fleetserve.control.spec import DeploymentSpec
from fleetserve.control.store import ReplicaRow

log = logging.getLogger("fleetserve.hathora")

__all__ = ["DEFAULT_IMAGE", "REGIONS", "HathoraProvider", "worker_env"]

CONTAINER_PORT = 8000
DEFAULT_CPU = 2.0  # cores; Hathora wants memory in steps of 2048 MB per core
DEFAULT_MEMORY_MB = 4096
APP_NAME = "fleetserve"
SECRET_ENV = frozenset({"HF_TOKEN", "FLEETSERVE_API_KEY"})  # never part of a reuse key or a tag
LOCATOR = "hathora-process:"  # ReplicaRow.log_path of a Hathora replica: where its logs live
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


class HathoraBuildFailed(HathoraError):
    hint = "Check that the image exists and Hathora can pull it (public, or registry auth configured)"


def worker_env(spec: DeploymentSpec, internal_key: str | None) -> list[EnvVar]:
    """The deployment's env: the worker's whole configuration. The HF token is its own entry, nothing else."""
    cfg = {"model": spec.model, "revision": spec.revision, "precision": spec.precision, "device": spec.device,
           "max_model_len": spec.max_model_len, **spec.engine_args}
    env = [EnvVar(name="DEPLOYMENT_CONFIG_JSON",
                  value=json.dumps({k: v for k, v in cfg.items() if v is not None}, sort_keys=True)),
           EnvVar(name="FLEETSERVE_SERVED_MODEL_NAME", value=spec.name)]
    if internal_key:
        env.append(EnvVar(name="FLEETSERVE_API_KEY", value=internal_key))
    if spec.hf_token is not None:
        env.append(EnvVar(name="HF_TOKEN", value=spec.hf_token.get_secret_value()))
    return env


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class _Replica:
    """What this control plane knows about one room beyond its store row (not persisted)."""

    task: asyncio.Task | None = None
    error: str | None = None
    room: RoomConnection | None = None
    process_id: str | None = None
    stop_requested: bool = False
    drain_sent: bool = False  # the process was asked to stop (Hathora SIGTERMs it; the worker drains)
    stopped_seen: bool = False
    destroyed: bool = False


@dataclass
class _Plan:
    image: str
    config: DeploymentConfigV3
    tag: str  # deploymentTag: the spec's reuse key (secrets excluded)
    key: str  # in-memory reuse key (includes a digest of the secrets, never persisted)


@dataclass
class HathoraProvider:
    client: HathoraClient
    home: Path
    internal_key: str | None = None
    app_id: str | None = None  # HATHORA_APP_ID; None: the one created earlier (home/hathora.json) or a new one
    build_poll_s: float = 2.0
    build_timeout_s: float = 1800.0
    name: str = "hathora"
    _replicas: dict[str, _Replica] = field(default_factory=dict)
    _builds: dict[str, str] = field(default_factory=dict)  # image -> buildId
    _deployments: dict[str, str] = field(default_factory=dict)  # plan key -> deploymentId
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _app_checked: bool = False

    @classmethod
    def from_env(cls, home: Path, internal_key: str | None = None, env: dict[str, str] | None = None,
                 **kw) -> HathoraProvider:
        env = os.environ if env is None else env
        from fleetserve.logs import register_secret

        register_secret(env.get("HATHORA_TOKEN"))
        return cls(HathoraClient.from_env(env), home, internal_key, env.get("HATHORA_APP_ID") or None, **kw)

    @property
    def replica_scheme(self) -> str:
        host = urlparse(self.client.base_url).hostname or ""
        return "http" if host in LOOPBACK else "https"

    async def aclose(self) -> None:
        for st in self._replicas.values():
            if st.task and not st.task.done():
                st.task.cancel()
        await self.client.aclose()

    # ---- app, build, deployment

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def ensure_app(self) -> str:
        async with self._lock("app"):
            state_file = self.home / "hathora.json"
            if self.app_id is None and state_file.exists():
                self.app_id = json.loads(state_file.read_text()).get("app_id")
            if self.app_id is None:
                app = await self.client.create_app(APP_NAME)
                self.app_id = app.app_id
                state_file.parent.mkdir(parents=True, exist_ok=True)
                state_file.write_text(json.dumps({"app_id": self.app_id}))
                log.info("created Hathora app %s (%s)", APP_NAME, self.app_id)
            elif not self._app_checked:
                await self.client.get_app(self.app_id)  # a wrong HATHORA_APP_ID fails here, clearly
            self._app_checked = True
            return self.app_id

    def plan(self, spec: DeploymentSpec) -> _Plan:
        image = spec.image or default_image(spec.backend, gpu=spec.gpu is not None)
        env = worker_env(spec, self.internal_key)
        cpu = spec.cpu or DEFAULT_CPU
        memory = spec.memory_mb or DEFAULT_MEMORY_MB
        gpu = spec.gpu
        public = {"image": image, "cpu": cpu, "memory_mb": memory, "gpu": getattr(gpu, "count", None),
                  "env": {e.name: e.value for e in env if e.name not in SECRET_ENV}}
        tag = f"fleetserve/{spec.name}/{_digest(public)}"
        secrets = _digest({e.name: e.value for e in env if e.name in SECRET_ENV})
        config = DeploymentConfigV3(buildId="", idleTimeoutEnabled=False, env=env, roomsPerProcess=1,
                                    transportType="tls", containerPort=CONTAINER_PORT, requestedMemoryMB=memory,
                                    requestedCPU=cpu, requestedGPU=getattr(gpu, "count", None) or None,
                                    deploymentTag=tag)
        return _Plan(image, config, tag, f"{tag}/{secrets}")

    async def ensure_build(self, app_id: str, image: str) -> str:
        async with self._lock(f"build:{image}"):
            if image in self._builds:
                return self._builds[image]
            build = await self.client.create_registry_build(build_tag=image)
            log.info("Hathora build %s: pulling %s", build.build_id, image)
            output = await self.client.run_registry_build(build.build_id, image)
            deadline = time.monotonic() + self.build_timeout_s
            while True:
                b = await self.client.get_build(build.build_id)
                if b.status == "succeeded":
                    break
                if b.status == "failed":
                    last = " | ".join(line for line in output.splitlines()[-5:] if line.strip())
                    raise HathoraBuildFailed("build", None, f"build {b.build_id} of image {image} failed: {last}")
                if time.monotonic() > deadline:
                    raise HathoraBuildFailed("build", None, f"build {b.build_id} still {b.status} after "
                                                            f"{self.build_timeout_s:.0f}s")
                await asyncio.sleep(self.build_poll_s)
            self._builds[image] = build.build_id
            return build.build_id

    async def ensure_deployment(self, spec: DeploymentSpec) -> tuple[str, str]:
        """(appId, deploymentId) for this spec, creating the build and the deployment only when needed."""
        app_id = await self.ensure_app()
        plan = self.plan(spec)
        async with self._lock(f"deployment:{spec.name}"):
            if plan.key in self._deployments:
                return app_id, self._deployments[plan.key]
            latest = await self.client.latest_deployment(app_id)
            if latest is not None and latest.deployment_tag == plan.tag and not self._deployments_of(spec.name):
                # a control plane restarted: the newest deployment already is this spec's
                self._deployments[plan.key] = latest.deployment_id
                if latest.build_tag == plan.image or latest.build_tag is None:
                    self._builds.setdefault(plan.image, latest.build_id)
                return app_id, latest.deployment_id
            build_id = await self.ensure_build(app_id, plan.image)
            config = plan.config.model_copy(update={"build_id": build_id})
            dep = await self.client.create_deployment(app_id, config)
            log.info("Hathora deployment %s for %s (build %s, %s)", dep.deployment_id, spec.name, build_id, config)
            self._deployments[plan.key] = dep.deployment_id
            return app_id, dep.deployment_id

    def _deployments_of(self, name: str) -> list[str]:
        return [k for k in self._deployments if k.startswith(f"fleetserve/{name}/")]

    # ---- the Provider protocol

    async def start(self, spec: DeploymentSpec, replica_id: str, generation: int) -> ReplicaRow:
        region = spec.region
        if region not in REGIONS:
            raise ValueError(f"Hathora region {region!r} is not one of {', '.join(REGIONS)}")
        st = self._replicas[replica_id] = _Replica()
        st.task = asyncio.create_task(self._create_room(spec, replica_id, region, st))
        return ReplicaRow(replica_id, spec.name, generation, CONTAINER_PORT, None, None, "starting", time.time(),
                          None)

    async def _create_room(self, spec: DeploymentSpec, replica_id: str, region: str, st: _Replica) -> None:
        try:
            app_id, deployment_id = await self.ensure_deployment(spec)
            st.room = await self.client.create_room(app_id, region, deployment_id, room_id=replica_id)
            st.process_id = st.room.process_id
            log.info("Hathora room %s in %s (process %s)", replica_id, region, st.process_id)
            if st.stop_requested:  # scaled down or deleted while it was being created
                await self._stop_room(replica_id, st, force=True)
                self._replicas.pop(replica_id, None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # surfaces through observe() as a failed start with this reason
            st.error = str(exc)
            log.warning("Hathora replica %s failed to start: %s", replica_id, exc)

    def _state(self, r: ReplicaRow) -> _Replica:
        st = self._replicas.get(r.id)
        if st is None:  # a replica started by an earlier control plane: adopted from its row
            st = self._replicas[r.id] = _Replica()
            if r.log_path and r.log_path.startswith(LOCATOR):
                st.process_id = r.log_path[len(LOCATOR):]
        return st

    async def observe(self, r: ReplicaRow) -> Liveness:
        st = self._state(r)
        if st.task is not None and not st.task.done():
            return Liveness(True)
        if st.error is not None:
            return Liveness(False, None, st.error)
        if st.process_id and r.log_path != f"{LOCATOR}{st.process_id}":
            r.log_path = f"{LOCATOR}{st.process_id}"  # persisted by the router: a restarted control plane finds it
        app_id = self.app_id
        try:
            if app_id is None:
                app_id = await self.ensure_app()
            if st.process_id is None:  # the room id is all we know: ask whether the room still exists
                await self.client.connection_info(app_id, r.id)
                return Liveness(True)
            proc = await self.client.get_process(app_id, st.process_id)
        except HathoraNotFound:
            return Liveness(False, None, f"Hathora room {r.id} / process {st.process_id} no longer exists")
        except HathoraError as exc:  # the API is having a bad moment: keep the replica, look again later
            log.warning("cannot observe Hathora replica %s: %s", r.id, exc)
            return Liveness(True)
        if proc.status in ("stopped", "failed"):
            st.stopped_seen = True
            return Liveness(False, None, await self._reason(app_id, st.process_id, proc.status))
        return Liveness(True)

    async def _reason(self, app_id: str, process_id: str, status: str) -> str:
        why = f"Hathora process {process_id} {status}"
        try:
            lines = await self.client.process_logs(app_id, process_id, 60)
        except HathoraError:
            return why
        for line in reversed(lines):
            if any(w in line.lower() for w in ("error", "failed", "exception")):
                return f"{why}: {line.strip()[-400:]}"
        return why

    async def ready(self, r: ReplicaRow, client: httpx.AsyncClient) -> bool:
        st = self._state(r)
        if st.task is not None and not st.task.done() or st.error is not None:
            return False
        url = r.url
        if url is None:
            try:
                info = await self.client.connection_info(self.app_id or await self.ensure_app(), r.id)
            except HathoraError:
                return False
            if info.status != "active" or info.exposed_port is None:
                return False
            port = info.exposed_port
            url = f"{self.replica_scheme}://{port.host}:{port.port}"
        try:
            resp = await client.get(f"{url}/readyz", timeout=5.0)
        except httpx.HTTPError:
            return False
        if resp.status_code != 200:
            return False
        # the reconciler stores the row when it turns ready: URL and process id persist with it
        r.url, r.port = url, urlparse(url).port
        if st.process_id:
            r.log_path = f"{LOCATOR}{st.process_id}"
        return True

    async def stop(self, r: ReplicaRow, force: bool = False) -> None:
        st = self._state(r)
        if st.task is not None and not st.task.done():
            st.stop_requested = True  # the task destroys the room as soon as it exists
            if force:
                st.error = st.error or "stopped before its room was created"
            return
        await self._stop_room(r.id, st, force)

    async def _stop_room(self, room_id: str, st: _Replica, force: bool) -> None:
        if self.app_id is None:
            return
        try:
            if st.process_id and not st.stopped_seen and not st.drain_sent:
                await self._ignore_missing(self.client.stop_process(self.app_id, st.process_id))
                st.drain_sent = True
            if (force or not st.process_id) and not st.destroyed:
                await self._ignore_missing(self.client.destroy_room(self.app_id, room_id))
                st.destroyed = True
            st.stop_requested = True
        except HathoraError as exc:
            log.warning("stopping Hathora replica %s failed: %s", room_id, exc)

    @staticmethod
    async def _ignore_missing(call) -> None:
        try:
            await call
        except HathoraNotFound:
            pass

    async def release(self, r: ReplicaRow) -> None:
        """The replica is gone for the platform: its room must not outlive it (e.g. after its process failed)."""
        st = self._replicas.get(r.id)
        if st is None or (st.task is not None and not st.task.done()):
            return  # a creation still under way destroys its room itself (stop_requested)
        if st.error is None and not st.destroyed:
            await self._stop_room(r.id, st, force=True)
        self._replicas.pop(r.id, None)

    async def logs(self, r: ReplicaRow, tail: int) -> list[str]:
        st = self._state(r)
        if st.error:
            return [f"(replica failed to start: {st.error})"]
        if not st.process_id or self.app_id is None:
            return []
        try:
            return await self.client.process_logs(self.app_id, st.process_id, tail)
        except HathoraError as exc:
            return [f"(logs unavailable: {exc})"]

    def log_file(self, r: ReplicaRow) -> Path | None:
        return None  # logs live in Hathora; `logs` reads them through the API
