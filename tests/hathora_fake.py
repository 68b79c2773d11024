"""A strict local fake of the Hathora Cloud API (the parts in shared/hathora-api.md), for tests.

It enforces the contract rather than accepting anything: the bearer token on every call but connection
info, the documented paths and methods, required fields and their JSON types (422 `{"message"}`
otherwise), the status codes (201 for creates, 204 for destroy/stop, 404 for unknown ids), the room
lifecycle (a room is `starting` until its process listens, then `active` with an `exposedPort`) and
"latest" semantics. It can answer a burst of 429s (with `Retry-After`) or scripted failures.

A room's process is REAL: creating a room starts `python -m fleetserve serve` with exactly the env of the
room's deployment plus what Hathora adds (`HATHORA_DEFAULT_PORT`, `HATHORA_REGION`, `HATHORA_PROCESS_ID`,
`HATHORA_HOSTNAME`) on top of the "container's" base env (PATH, FLEETSERVE_HOME with the model cached...).
Its stdout/stderr is the process log the logs API serves. Stopping a process sends SIGTERM (the worker
drains and exits). Every request is recorded (method, path, query, body) so tests can check where
secrets went.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import psutil
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tests.net import free_port

REGIONS = ("Seattle", "Los_Angeles", "Washington_DC", "Chicago", "London", "Frankfurt", "Mumbai", "Singapore",
           "Tokyo", "Sydney", "Sao_Paulo", "Dallas", "Johannesburg", "Dubai")
METRICS = ("cpu", "memory", "rateEgress", "totalEgress", "activeConnections", "gpuMemory", "gpuUtilization")
MAX_MEMORY_MB = 8192  # Hathora's default cap on requestedMemoryMB


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")



class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CreateAppBody(Strict):
    appName: str = Field(min_length=1)
    authConfiguration: dict[str, dict]


class CreateBuildBody(Strict):
    buildId: str | None = None
    buildTag: str | None = None


class RunRegistryBody(Strict):
    image: str = Field(min_length=1)
    registryUrl: str | None = None
    auth: str | None = None


class EnvEntry(Strict):
    name: str = Field(min_length=1)
    value: str


class ContainerPortBody(Strict):
    transportType: Literal["tcp", "udp", "tls"]
    port: int
    name: str


class CreateDeploymentBody(Strict):
    buildId: str
    idleTimeoutEnabled: bool
    env: list[EnvEntry]
    roomsPerProcess: int = Field(ge=1, le=10000)
    transportType: Literal["tcp", "udp", "tls"]
    containerPort: int = Field(ge=1, le=65535)
    requestedMemoryMB: float = Field(gt=0, le=MAX_MEMORY_MB)
    requestedCPU: float = Field(gt=0)
    requestedGPU: int | None = Field(None, ge=0)
    additionalContainerPorts: list[ContainerPortBody] | None = None
    deploymentTag: str | None = None


class CreateRoomBody(Strict):
    region: Literal[REGIONS]  # type: ignore[valid-type]
    deploymentId: str | None = None
    roomConfig: str | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


@dataclass
class FakeProcess:
    process_id: str
    app_id: str
    deployment_id: str
    region: str
    port: int
    log_path: Path
    popen: subprocess.Popen
    env: dict[str, str]
    status: str = "starting"
    created: float = field(default_factory=time.time)
    starting_at: str = field(default_factory=_now)
    started_at: str | None = None
    stopping_at: str | None = None
    terminated_at: str | None = None
    stop_requested: bool = False

    def exposed(self) -> dict | None:
        if self.status not in ("running", "draining"):
            return None
        return {"host": "127.0.0.1", "port": self.port, "transportType": "tls", "name": "default"}

    def view(self, rooms_per_process: int) -> dict:
        return {"processId": self.process_id, "appId": self.app_id, "deploymentId": self.deployment_id,
                "region": self.region, "status": self.status, "exposedPort": self.exposed(),
                "additionalExposedPorts": [], "roomsPerProcess": rooms_per_process, "roomSlotsAvailable": 0,
                "startingAt": self.starting_at, "startedAt": self.started_at, "stoppingAt": self.stopping_at,
                "terminatedAt": self.terminated_at, "createdAt": self.starting_at}


@dataclass
class FakeRoom:
    room_id: str
    app_id: str
    process_id: str
    room_config: str | None
    status: str = "starting"  # starting -> active; destroyed


class FakeHathora:
    def __init__(self, workdir: Path, token: str = "hathora-dev-token-" + "t" * 24,
                 base_env: dict[str, str] | None = None, command: list[str] | None = None):
        self.workdir = workdir
        self.command = command or [sys.executable, "-m", "fleetserve", "serve"]  # the image's entrypoint
        self.token = token
        self.base_env = base_env or {}
        self.lock = threading.RLock()
        self.requests: list[dict[str, Any]] = []
        self.apps: dict[str, dict] = {}
        self.builds: dict[str, dict] = {}
        self.deployments: dict[str, dict] = {}  # deploymentId -> DeploymentV3 (with env values)
        self.rooms: dict[str, FakeRoom] = {}
        self.processes: dict[str, FakeProcess] = {}
        self.burst_429 = 0  # the next N authenticated calls answer 429
        self.retry_after = "1"
        self.failures: list[dict] = []  # scripted: {"method", "path_contains", "status", "message", "times"}
        self.bad_images: set[str] = set()  # runRegistry of these fails (the image cannot be pulled)
        self.app = self._make_app()
        self._server: uvicorn.Server | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.url = ""

    # ---- life

    def start(self) -> FakeHathora:
        port = free_port()
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning",
                                                     access_log=False, lifespan="off"))
        t = threading.Thread(target=self._server.run, daemon=True)
        t.start()
        deadline = time.time() + 20
        while not self._server.started:
            if time.time() > deadline:
                raise RuntimeError("the fake Hathora API did not start")
            time.sleep(0.02)
        m = threading.Thread(target=self._monitor, daemon=True)
        m.start()
        self._threads = [t, m]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        self._stop.set()
        with self.lock:
            procs = list(self.processes.values())
        for p in procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.time() + 15
        for p in procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
        if self._server is not None:
            self._server.should_exit = True
        for t in self._threads:
            t.join(timeout=10)

    def _monitor(self) -> None:
        """Drives the lifecycle: starting -> running once the worker listens; stopped/failed when it exits."""
        while not self._stop.is_set():
            with self.lock:
                procs = list(self.processes.values())
            for p in procs:
                code = p.popen.poll()
                with self.lock:
                    if code is not None and p.status not in ("stopped", "failed"):
                        p.status = "stopped" if p.stop_requested or code == 0 else "failed"
                        p.terminated_at = _now()
                        for room in self.rooms.values():
                            if room.process_id == p.process_id:
                                room.status = "destroyed"
                    elif code is None and p.status == "starting" and _listening(p.port):
                        p.status, p.started_at = "running", _now()
                        for room in self.rooms.values():
                            if room.process_id == p.process_id and room.status == "starting":
                                room.status = "active"
            time.sleep(0.1)

    # ---- helpers for tests

    def all_traffic(self) -> str:
        return json.dumps(self.requests)

    def running_processes(self) -> list[FakeProcess]:
        with self.lock:
            return [p for p in self.processes.values() if p.popen.poll() is None]

    def live_rooms(self) -> list[FakeRoom]:
        with self.lock:
            return [r for r in self.rooms.values() if r.status != "destroyed"]

    # ---- the API

    def _make_app(self) -> FastAPI:  # noqa: C901 (one route table)
        app = FastAPI()
        fake = self

        @app.middleware("http")
        async def record_and_gate(request: Request, call_next):
            body = await request.body()
            path = request.url.path
            open_route = "/connectioninfo/" in path or path == "/discovery/v2/ping"
            auth = request.headers.get("authorization")
            entry = {"method": request.method, "path": path, "query": request.url.query,
                     "body": body.decode(errors="replace"), "authorized": auth == f"Bearer {fake.token}",
                     "headers": {k: v for k, v in request.headers.items() if k.lower() != "authorization"}}
            with fake.lock:
                fake.requests.append(entry)
                for rule in fake.failures:
                    if rule["times"] > 0 and rule["method"] == request.method and rule["path_contains"] in path:
                        rule["times"] -= 1
                        return JSONResponse({"message": rule["message"]}, status_code=rule["status"])
                if not open_route:
                    if auth is None or not auth.startswith("Bearer "):
                        return JSONResponse({"message": "missing bearer token"}, status_code=401)
                    if auth != f"Bearer {fake.token}":
                        return JSONResponse({"message": "invalid or expired token"}, status_code=401)
                    if fake.burst_429 > 0:
                        fake.burst_429 -= 1
                        return JSONResponse({"message": "rate limit exceeded"}, status_code=429,
                                            headers={"Retry-After": fake.retry_after})
            return await call_next(request)

        @app.exception_handler(ApiError)
        async def api_error(request: Request, exc: ApiError):
            return JSONResponse({"message": exc.message}, status_code=exc.status)

        @app.exception_handler(404)
        async def not_found(request: Request, exc):
            return JSONResponse({"message": f"no route {request.method} {request.url.path}"}, status_code=404)

        @app.exception_handler(405)
        async def not_allowed(request: Request, exc):
            return JSONResponse({"message": f"method {request.method} not allowed on {request.url.path}"},
                                status_code=405)

        async def parse(request: Request, model: type[BaseModel]) -> Any:
            if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                raise ApiError(422, "expected a JSON body (Content-Type: application/json)")
            try:
                return model.model_validate_json(await request.body())
            except ValidationError as exc:
                errs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
                raise ApiError(422, f"invalid request body: {errs}") from None

        def get_app(app_id: str) -> dict:
            if app_id not in fake.apps:
                raise ApiError(404, f"app {app_id} not found")
            return fake.apps[app_id]

        # apps
        @app.post("/apps/v2/apps")
        async def create_app(request: Request):
            body = await parse(request, CreateAppBody)
            app_id = f"app-{uuid.uuid4()}"
            with fake.lock:
                fake.apps[app_id] = {"appId": app_id, "appName": body.appName, "orgId": "org-fake",
                                     "authConfiguration": body.authConfiguration, "createdAt": _now(),
                                     "createdBy": "fleetserve-tests", "deletedAt": None, "deletedBy": None,
                                     "appSecret": "secret-" + uuid.uuid4().hex}
                return JSONResponse(fake.apps[app_id], status_code=201)

        @app.get("/apps/v2/apps/{app_id}")
        async def read_app(app_id: str):
            with fake.lock:
                return get_app(app_id)

        # builds
        @app.post("/builds/v3/builds/registry")
        async def create_build(request: Request):
            body = await parse(request, CreateBuildBody)
            build_id = body.buildId or f"bld-{uuid.uuid4().hex[:12]}"
            with fake.lock:
                if build_id in fake.builds:
                    raise ApiError(400, f"build {build_id} already exists")
                fake.builds[build_id] = {"buildId": build_id, "buildTag": body.buildTag, "status": "created",
                                         "imageSize": 0, "orgId": "org-fake", "createdAt": _now(),
                                         "createdBy": "fleetserve-tests", "startedAt": None, "finishedAt": None,
                                         "deletedAt": None, "image": None}
                return JSONResponse({k: v for k, v in fake.builds[build_id].items() if k != "image"},
                                    status_code=201)

        @app.post("/builds/v3/builds/{build_id}/runRegistry")
        async def run_build(build_id: str, request: Request):
            body = await parse(request, RunRegistryBody)
            with fake.lock:
                build = fake.builds.get(build_id)
                if build is None:
                    raise ApiError(404, f"build {build_id} not found")
                if build["status"] != "created":
                    raise ApiError(400, f"build {build_id} was already run")
                build.update(image=body.image, startedAt=_now(), finishedAt=_now())
                failed = body.image in fake.bad_images
                build["status"] = "failed" if failed else "succeeded"
                build["imageSize"] = 0 if failed else 123_456_789
            text = (f"pulling {body.image}\n" + (f"error: manifest for {body.image} not found\n" if failed
                                                 else "pulled; pushing to Hathora's registry\ndone\n"))
            return Response(text.encode(), media_type="application/octet-stream")

        @app.get("/builds/v3/builds/{build_id}")
        async def read_build(build_id: str):
            with fake.lock:
                if build_id not in fake.builds:
                    raise ApiError(404, f"build {build_id} not found")
                return {k: v for k, v in fake.builds[build_id].items() if k != "image"}

        # deployments
        @app.post("/deployments/v3/apps/{app_id}/deployments")
        async def create_deployment(app_id: str, request: Request):
            body = await parse(request, CreateDeploymentBody)
            with fake.lock:
                get_app(app_id)
                build = fake.builds.get(body.buildId)
                if build is None:
                    raise ApiError(404, f"build {body.buildId} not found")
                if build["status"] != "succeeded":
                    raise ApiError(400, f"build {body.buildId} is {build['status']}, not succeeded")
                names = [e.name for e in body.env]
                if len(set(names)) != len(names):
                    raise ApiError(422, "env names must be unique")
                dep_id = f"dep-{len(fake.deployments) + 1}-{uuid.uuid4().hex[:6]}"
                dep = {"deploymentId": dep_id, "appId": app_id, "buildId": body.buildId,
                       "buildTag": build["buildTag"], "deploymentTag": body.deploymentTag,
                       "idleTimeoutEnabled": body.idleTimeoutEnabled,
                       "env": [e.model_dump() for e in body.env], "roomsPerProcess": body.roomsPerProcess,
                       "defaultContainerPort": {"transportType": body.transportType, "port": body.containerPort,
                                                "name": "default"},
                       "additionalContainerPorts": [p.model_dump() for p in body.additionalContainerPorts or []],
                       "requestedCPU": body.requestedCPU, "requestedMemoryMB": body.requestedMemoryMB,
                       "createdAt": _now(), "createdBy": "fleetserve-tests", "_seq": len(fake.deployments)}
                if body.requestedGPU is not None:
                    dep["experimentalRequestedGPU"] = body.requestedGPU
                fake.deployments[dep_id] = dep
                return JSONResponse(_public(dep), status_code=201)

        @app.get("/deployments/v3/apps/{app_id}/deployments/latest")
        async def latest_deployment(app_id: str):
            with fake.lock:
                get_app(app_id)
                mine = [d for d in fake.deployments.values() if d["appId"] == app_id]
                if not mine:
                    raise ApiError(404, f"app {app_id} has no deployments")
                return _public(max(mine, key=lambda d: d["_seq"]))

        # rooms
        @app.post("/rooms/v2/{app_id}/create")
        async def create_room(app_id: str, request: Request):
            body = await parse(request, CreateRoomBody)
            room_id = request.query_params.get("roomId") or uuid.uuid4().hex[:12]
            with fake.lock:
                get_app(app_id)
                if room_id in fake.rooms and fake.rooms[room_id].status != "destroyed":
                    raise ApiError(400, f"room {room_id} already exists")
                if body.deploymentId is not None:
                    dep = fake.deployments.get(body.deploymentId)
                    if dep is None or dep["appId"] != app_id:
                        raise ApiError(404, f"deployment {body.deploymentId} not found")
                else:
                    mine = [d for d in fake.deployments.values() if d["appId"] == app_id]
                    if not mine:
                        raise ApiError(404, f"app {app_id} has no deployment to run rooms on")
                    dep = max(mine, key=lambda d: d["_seq"])
                proc = fake._spawn(app_id, dep, body.region)
                fake.rooms[room_id] = FakeRoom(room_id, app_id, proc.process_id, body.roomConfig)
                return JSONResponse({"roomId": room_id, "processId": proc.process_id, "status": "starting",
                                     "additionalExposedPorts": []}, status_code=201)

        @app.get("/rooms/v2/{app_id}/connectioninfo/{room_id}")
        async def connection_info(app_id: str, room_id: str):
            with fake.lock:
                get_app(app_id)
                room = fake.rooms.get(room_id)
                if room is None or room.app_id != app_id or room.status == "destroyed":
                    raise ApiError(404, f"room {room_id} not found")
                out = {"roomId": room_id, "status": room.status, "additionalExposedPorts": []}
                exposed = fake.processes[room.process_id].exposed()
                if room.status == "active" and exposed:
                    out["exposedPort"] = exposed
                return out

        @app.post("/rooms/v2/{app_id}/destroy/{room_id}")
        async def destroy_room(app_id: str, room_id: str):
            with fake.lock:
                get_app(app_id)
                room = fake.rooms.get(room_id)
                if room is None or room.app_id != app_id or room.status == "destroyed":
                    raise ApiError(404, f"room {room_id} not found")
                room.status = "destroyed"  # the process keeps running: idle timeout is the app's choice
            return Response(status_code=204)

        # processes
        def get_proc(app_id: str, process_id: str) -> FakeProcess:
            get_app(app_id)
            p = fake.processes.get(process_id)
            if p is None or p.app_id != app_id:
                raise ApiError(404, f"process {process_id} not found")
            return p

        @app.get("/processes/v3/apps/{app_id}/processes/latest")
        async def latest_processes(app_id: str, request: Request):
            statuses = request.query_params.getlist("status")
            regions = request.query_params.getlist("region")
            for s in statuses:
                if s not in ("starting", "running", "draining", "stopping", "stopped", "failed"):
                    raise ApiError(422, f"invalid status {s!r}")
            for r in regions:
                if r not in REGIONS:
                    raise ApiError(422, f"invalid region {r!r}")
            with fake.lock:
                get_app(app_id)
                procs = [p for p in fake.processes.values() if p.app_id == app_id
                         and (not statuses or p.status in statuses) and (not regions or p.region in regions)]
                procs.sort(key=lambda p: p.created, reverse=True)
                return [p.view(fake.deployments[p.deployment_id]["roomsPerProcess"]) for p in procs[:1000]]

        @app.get("/processes/v3/apps/{app_id}/processes/{process_id}")
        async def read_process(app_id: str, process_id: str):
            with fake.lock:
                p = get_proc(app_id, process_id)
                return p.view(fake.deployments[p.deployment_id]["roomsPerProcess"])

        @app.post("/processes/v3/apps/{app_id}/processes/{process_id}/stop")
        async def stop_process(app_id: str, process_id: str):
            with fake.lock:
                p = get_proc(app_id, process_id)
                if p.status in ("stopped", "failed"):
                    return Response(status_code=204)
                p.stop_requested = True
                p.status, p.stopping_at = "stopping", _now()
                if p.popen.poll() is None:
                    p.popen.send_signal(signal.SIGTERM)
            return Response(status_code=204)

        @app.get("/processes/v3/apps/{app_id}/processes/process/{process_id}/metrics")
        async def process_metrics(app_id: str, process_id: str, request: Request):
            names = request.query_params.getlist("metrics")
            for n in names:
                if n not in METRICS:
                    raise ApiError(422, f"invalid metric {n!r}; one of {', '.join(METRICS)}")
            with fake.lock:
                p = get_proc(app_id, process_id)
            ts = time.time()
            values = {"cpu": 0.0, "memory": 0.0}
            try:
                ps = psutil.Process(p.popen.pid)
                values = {"cpu": ps.cpu_percent(interval=None), "memory": float(ps.memory_info().rss)}
            except psutil.Error:
                pass
            return {n: [{"timestamp": ts, "value": values.get(n, 0.0)}] for n in names or ("cpu", "memory")}

        # logs
        @app.get("/logs/v1/{app_id}/process/{process_id}")
        async def process_logs(app_id: str, process_id: str, request: Request):
            q = request.query_params
            tail = q.get("tailLines")
            if tail is not None and (not tail.isdigit() or not 1 <= int(tail) <= 5000):
                raise ApiError(422, "tailLines must be an integer from 1 to 5000")
            if q.get("follow") not in (None, "true", "false"):
                raise ApiError(422, "follow must be true or false")
            with fake.lock:
                p = get_proc(app_id, process_id)
            lines = p.log_path.read_text(errors="replace").splitlines() if p.log_path.exists() else []
            if tail is not None:
                lines = lines[-int(tail):]
            return PlainTextResponse("".join(line + "\n" for line in lines))

        @app.get("/discovery/v2/ping")
        async def ping():
            return [{"region": r, "host": "127.0.0.1", "port": 1} for r in REGIONS]

        return app

    def _spawn(self, app_id: str, dep: dict, region: str) -> FakeProcess:
        """Runs the deployment's "container": `fleetserve serve` with the deployment's env, as Hathora would."""
        process_id = str(uuid.uuid4())
        port = free_port()
        env = {**self.base_env, **{e["name"]: e["value"] for e in dep["env"]},
               "HATHORA_DEFAULT_PORT": str(port), "HATHORA_REGION": region, "HATHORA_PROCESS_ID": process_id,
               "HATHORA_HOSTNAME": "127.0.0.1", "HATHORA_APP_ID": app_id}
        log_path = self.workdir / "processes" / f"{process_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(self.command, env=env, stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        proc = FakeProcess(process_id, app_id, dep["deploymentId"], region, port, log_path, popen, env)
        self.processes[process_id] = proc
        return proc


def _public(dep: dict) -> dict:
    return {k: v for k, v in dep.items() if not k.startswith("_")}


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def container_base_env(home: Path) -> dict[str, str]:
    """What the "image" provides: the Python environment and a FLEETSERVE_HOME with the model cached."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEETSERVE_", "HATHORA_"))
           and k not in ("HF_TOKEN", "PORT", "HOST", "MODEL_PATH", "DEPLOYMENT_CONFIG_JSON", "LOG_LEVEL")}
    env["FLEETSERVE_HOME"] = str(home)
    return env
