"""A small fake Kubernetes API server for the provider's tests: the few paths the provider uses, with
their verbs and object shapes checked. Server-side apply must come as PATCH with
`Content-Type: application/apply-patch+yaml`, `fieldManager=fleetserve` and `force=true`, and the body
must be a valid object of the path's kind (checked with kubernetes-validate, strict). Applying a
Deployment makes one pod for it, in the state the test chooses (`pod_state`). Every request is recorded."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import kubernetes_validate
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from tests.net import free_port

K8S_VERSION = "1.37.0"
KINDS = {("", "secrets"): ("v1", "Secret"), ("", "services"): ("v1", "Service"),
         ("apps", "deployments"): ("apps/v1", "Deployment")}


def status(code: int, reason: str, message: str) -> JSONResponse:
    return JSONResponse({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                         "message": message, "reason": reason, "code": code}, status_code=code)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeKubernetes:
    def __init__(self):
        self.lock = threading.RLock()
        self.objects: dict[tuple[str, str, str], dict] = {}  # (resource, namespace, name) -> object
        self.pods: dict[tuple[str, str], dict] = {}  # (namespace, name) -> pod
        self.requests: list[dict[str, Any]] = []
        self.pod_state = "ready"  # ready | pending | crashloop
        self.logs = "worker started\nloading model\nready\n"
        self.app = self._make_app()
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FakeKubernetes:
        port = free_port()
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning",
                                                     lifespan="off", access_log=False))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.time() + 20
        while not self._server.started:
            assert time.time() < deadline, "fake Kubernetes API did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _pod_for(self, ns: str, dep: dict) -> dict:
        labels = dep["spec"]["template"]["metadata"]["labels"]
        name = f"{dep['metadata']['name']}-{uuid.uuid4().hex[:9]}-{uuid.uuid4().hex[:5]}"
        container = dep["spec"]["template"]["spec"]["containers"][0]
        ready = self.pod_state == "ready"
        state: dict[str, Any] = {"running": {"startedAt": _now()}}
        last: dict[str, Any] = {}
        if self.pod_state == "crashloop":
            state = {"waiting": {"reason": "CrashLoopBackOff",
                                 "message": "back-off 40s restarting failed container=fleetserve"}}
            last = {"terminated": {"exitCode": 1, "reason": "Error", "startedAt": _now(), "finishedAt": _now()}}
        elif self.pod_state == "pending":
            state = {"waiting": {"reason": "ContainerCreating"}}
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": labels, "uid": str(uuid.uuid4()),
                             "creationTimestamp": _now()},
                "spec": dep["spec"]["template"]["spec"],
                "status": {"phase": "Running" if self.pod_state != "pending" else "Pending",
                           "podIP": "127.0.0.1" if self.pod_state != "pending" else None,
                           "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                           "containerStatuses": [{"name": container["name"], "image": container["image"],
                                                  "imageID": "", "ready": ready, "restartCount": 3 if last else 0,
                                                  "state": state, "lastState": last}]}}

    def _make_app(self) -> FastAPI:  # noqa: C901
        app = FastAPI()
        fake = self

        @app.middleware("http")
        async def record(request: Request, call_next):
            body = await request.body()
            with fake.lock:
                fake.requests.append({"method": request.method, "path": request.url.path,
                                      "query": dict(request.query_params),
                                      "content_type": request.headers.get("content-type"),
                                      "body": body.decode(errors="replace")})
            return await call_next(request)

        async def apply(request: Request, group: str, resource: str, ns: str, name: str):
            api_version, kind = KINDS[(group, resource)]
            if request.headers.get("content-type") != "application/apply-patch+yaml":
                return status(415, "UnsupportedMediaType", "only server-side apply is accepted here")
            q = request.query_params
            if q.get("fieldManager") != "fleetserve" or q.get("force") != "true":
                return status(400, "BadRequest", "fieldManager=fleetserve and force=true are required")
            obj = json.loads(await request.body())
            if obj.get("apiVersion") != api_version or obj.get("kind") != kind:
                return status(400, "BadRequest", f"expected {api_version} {kind}")
            meta = obj.get("metadata", {})
            if meta.get("name") != name or meta.get("namespace") != ns:
                return status(400, "BadRequest", "metadata.name/namespace must match the path")
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                return status(422, "Invalid", f"{kind} {name} is invalid: {exc.message}")
            with fake.lock:
                key = (resource, ns, name)
                created = key not in fake.objects
                obj = json.loads(json.dumps(obj))
                obj["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=_now(), resourceVersion="1")
                if kind == "Deployment":
                    obj["status"] = {"replicas": 1, "conditions": [
                        {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                         "message": "ok"}]}
                    if not any(p["metadata"]["labels"] == obj["spec"]["template"]["metadata"]["labels"]
                               for (pns, _), p in fake.pods.items() if pns == ns):
                        pod = fake._pod_for(ns, obj)
                        fake.pods[(ns, pod["metadata"]["name"])] = pod
                fake.objects[key] = obj
            return JSONResponse(obj, status_code=201 if created else 200)

        @app.patch("/api/v1/namespaces/{ns}/{resource}/{name}")
        async def core_patch(ns: str, resource: str, name: str, request: Request):
            if ("", resource) not in KINDS:
                return status(404, "NotFound", f"no resource {resource}")
            return await apply(request, "", resource, ns, name)

        @app.patch("/apis/apps/v1/namespaces/{ns}/deployments/{name}")
        async def apps_patch(ns: str, name: str, request: Request):
            return await apply(request, "apps", "deployments", ns, name)

        @app.get("/apis/apps/v1/namespaces/{ns}/deployments/{name}")
        async def read_deployment(ns: str, name: str):
            with fake.lock:
                obj = fake.objects.get(("deployments", ns, name))
            if obj is None:
                return status(404, "NotFound", f'deployments.apps "{name}" not found')
            return obj

        @app.delete("/apis/apps/v1/namespaces/{ns}/deployments/{name}")
        async def delete_deployment(ns: str, name: str, request: Request):
            with fake.lock:
                obj = fake.objects.pop(("deployments", ns, name), None)
                if obj is None:
                    return status(404, "NotFound", f'deployments.apps "{name}" not found')
                labels = obj["spec"]["template"]["metadata"]["labels"]
                for key, pod in list(fake.pods.items()):  # graceful: pods terminate, then go away
                    if key[0] == ns and pod["metadata"]["labels"] == labels:
                        pod["metadata"]["deletionTimestamp"] = _now()
            return {"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}

        @app.get("/api/v1/namespaces/{ns}/pods")
        async def list_pods(ns: str, request: Request):
            selector = dict(part.split("=", 1) for part in request.query_params.get("labelSelector", "").split(",")
                            if part)
            with fake.lock:
                items = [p for (pns, _), p in fake.pods.items() if pns == ns
                         and all(p["metadata"]["labels"].get(k) == v for k, v in selector.items())]
            return {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}

        @app.delete("/api/v1/namespaces/{ns}/pods/{name}")
        async def delete_pod(ns: str, name: str):
            with fake.lock:
                pod = fake.pods.pop((ns, name), None)
            if pod is None:
                return status(404, "NotFound", f'pods "{name}" not found')
            return pod

        @app.get("/api/v1/namespaces/{ns}/pods/{name}/log")
        async def pod_log(ns: str, name: str, request: Request):
            with fake.lock:
                if (ns, name) not in fake.pods:
                    return status(404, "NotFound", f'pods "{name}" not found')
            if request.query_params.get("container") != "fleetserve":
                return status(400, "BadRequest", "container must be named")
            lines = fake.logs.splitlines()
            tail = request.query_params.get("tailLines")
            if tail:
                lines = lines[-int(tail):]
            return PlainTextResponse("".join(f"{line}\n" for line in lines))

        return app

    def finish_terminations(self) -> None:
        """Pods being deleted finish terminating (the kubelet's part)."""
        with self.lock:
            for key, pod in list(self.pods.items()):
                if pod["metadata"].get("deletionTimestamp"):
                    del self.pods[key]
