"""Kubernetes: manifests for a deployment, and a provider that runs replicas on a cluster.

`manifests(spec)` is what `fleetserve deploy ... --provider kubernetes --dry-run -o yaml` prints for
kubectl/GitOps users: a Secret (HF token and API key as `${...}` placeholders for envsubst, never the
values), a Deployment (`fleetserve serve` configured by env, `nvidia.com/gpu` limits when the spec asks for
GPUs, readiness `/readyz`, liveness `/healthz`, a `preStop` pause plus a termination grace period longer
than the worker's drain, a model-cache volume, HF token from the Secret via `secretKeyRef`, resource
requests, a non-root security context), a Service, and optionally an autoscaler: a KEDA ScaledObject on
`fleetserve_queue_depth` from Prometheus, or an HPA on the same metric as a Pods metric (needs a custom
metrics adapter such as prometheus-adapter).

`KubernetesProvider` is the platform's provider: the platform's reconciler and autoscaler own the replica
count, so each fleetserve replica is one Kubernetes Deployment of one pod (`fleetserve-NAME-<id>`), created
by server-side apply (field manager `fleetserve`) next to the deployment's shared Secret (real values,
applied through the API, never printed) and Service. Status comes from the Deployment's conditions and its
pod's container states, drain is deleting the Deployment (Kubernetes runs preStop, then SIGTERM: the worker
drains), logs come from the pod. The replica URL is the pod IP, so the platform must run inside the cluster
(or on a network that routes pod IPs).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx

from fleetserve.control.providers.base import Liveness
from fleetserve.control.providers.images import default_image
from fleetserve.control.spec import DeploymentSpec, KubernetesOptions
from fleetserve.control.store import ReplicaRow

log = logging.getLogger("fleetserve.kubernetes")

CONTAINER = "fleetserve"
PORT = 8000
CACHE_DIR = "/var/cache/fleetserve"  # FLEETSERVE_HOME in the pod: model cache and worker logs
UID = 1000
DRAIN_S = 30  # the worker's default drain_timeout_s
PRESTOP_S = 5  # endpoints drop the pod before SIGTERM reaches it
DEFAULT_CPU, DEFAULT_MEMORY_MB = 2.0, 4096
FIELD_MANAGER = "fleetserve"
APPLY = "application/apply-patch+yaml"
FAILING_WAITS = {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
                 "CreateContainerConfigError", "CreateContainerError"}


def object_name(spec: DeploymentSpec) -> str:
    return f"fleetserve-{spec.name}"[:63].rstrip("-")


def options(spec: DeploymentSpec) -> KubernetesOptions:
    return spec.kubernetes or KubernetesOptions()


def labels(spec: DeploymentSpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": "fleetserve", "app.kubernetes.io/instance": spec.name,
            "app.kubernetes.io/managed-by": "fleetserve", "fleetserve.dev/deployment": spec.name}


def _cpu(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{round(value * 1000)}m"


def worker_env(spec: DeploymentSpec, secret_name: str) -> list[dict[str, Any]]:
    cfg = {"model": spec.model, "revision": spec.revision, "precision": spec.precision, "device": spec.device,
           "max_model_len": spec.max_model_len, **spec.engine_args}
    return [
        {"name": "DEPLOYMENT_CONFIG_JSON", "value": json.dumps({k: v for k, v in cfg.items() if v is not None},
                                                               sort_keys=True)},
        {"name": "FLEETSERVE_SERVED_MODEL_NAME", "value": spec.name},
        {"name": "FLEETSERVE_HOST", "value": "0.0.0.0"},
        {"name": "FLEETSERVE_PORT", "value": str(PORT)},
        {"name": "FLEETSERVE_HOME", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},  # Hub downloads land on the cache volume
        {"name": "HOME", "value": "/tmp"},  # the root filesystem is read-only
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret_name, "key": "HF_TOKEN",
                                                            "optional": True}}},
        {"name": "FLEETSERVE_API_KEY", "valueFrom": {"secretKeyRef": {"name": secret_name,
                                                                      "key": "FLEETSERVE_API_KEY",
                                                                      "optional": True}}},
    ]


def secret_manifest(spec: DeploymentSpec, hf_token: str | None, api_key: str | None) -> dict[str, Any]:
    opts = options(spec)
    data = {k: v for k, v in (("HF_TOKEN", hf_token), ("FLEETSERVE_API_KEY", api_key)) if v is not None}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": object_name(spec), "namespace": opts.namespace, "labels": labels(spec)},
            "stringData": data}


def deployment_manifest(spec: DeploymentSpec, name: str | None = None, replicas: int | None = None,
                        extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    opts = options(spec)
    name = name or object_name(spec)
    pod_labels = {**labels(spec), **(extra_labels or {})}
    cpu = spec.cpu or DEFAULT_CPU
    memory = f"{spec.memory_mb or DEFAULT_MEMORY_MB}Mi"
    requests: dict[str, str] = {"cpu": _cpu(cpu), "memory": memory}
    limits: dict[str, str] = {"memory": memory}
    gpu = spec.gpu
    gpus = getattr(gpu, "count", 0) or 0
    if gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(gpus)
    cache = ({"persistentVolumeClaim": {"claimName": opts.model_cache_claim}} if opts.model_cache_claim
             else {"emptyDir": {}})
    container = {
        "name": CONTAINER,
        "image": spec.image or default_image(spec.backend, gpu=bool(gpus)),
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": worker_env(spec, object_name(spec)),
        "resources": {"requests": requests, "limits": limits},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5,
                           "timeoutSeconds": 3, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "initialDelaySeconds": 10,
                          "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6},
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_S)]}}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "model-cache", "mountPath": CACHE_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    pod_spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": PRESTOP_S + DRAIN_S + 10,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "model-cache", **cache}, {"name": "tmp", "emptyDir": {}}],
    }
    if gpus:
        pod_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    dep: dict[str, Any] = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": opts.namespace, "labels": pod_labels},
        "spec": {
            "selector": {"matchLabels": pod_labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "progressDeadlineSeconds": 1800,  # model downloads are slow; past this the replica counts as failed
            "template": {
                "metadata": {"labels": pod_labels, "annotations": {
                    "prometheus.io/scrape": "true", "prometheus.io/port": str(PORT), "prometheus.io/path": "/metrics"}},
                "spec": pod_spec,
            },
        },
    }
    if replicas is not None:
        dep["spec"]["replicas"] = replicas
    return dep


def service_manifest(spec: DeploymentSpec) -> dict[str, Any]:
    opts = options(spec)
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": object_name(spec), "namespace": opts.namespace, "labels": labels(spec)},
            "spec": {"type": opts.service_type, "selector": labels(spec),
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}


def queue_depth_query(spec: DeploymentSpec) -> str:
    opts = options(spec)
    return (f'sum(fleetserve_queue_depth{{namespace="{opts.namespace}",'
            f'pod=~"{object_name(spec)}-[a-z0-9]+-[a-z0-9]+"}})')


def autoscaler_manifest(spec: DeploymentSpec) -> dict[str, Any] | None:
    opts = options(spec)
    meta = {"name": object_name(spec), "namespace": opts.namespace, "labels": labels(spec)}
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": object_name(spec)}
    if opts.autoscaler == "keda":
        return {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": meta, "spec": {
            "scaleTargetRef": target,
            "minReplicaCount": spec.replicas.min, "maxReplicaCount": spec.replicas.max,
            "pollingInterval": 15,
            "cooldownPeriod": int(spec.autoscale.scale_to_zero_after_s),  # KEDA: idle time before zero
            "triggers": [{"type": "prometheus", "metricType": "AverageValue", "metadata": {
                "serverAddress": opts.prometheus_url, "query": queue_depth_query(spec),
                "threshold": f"{spec.autoscale.target_concurrency:g}"}}]}}
    if opts.autoscaler == "hpa":
        return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta, "spec": {
            "scaleTargetRef": target,
            "minReplicas": max(1, spec.replicas.min), "maxReplicas": spec.replicas.max,
            "metrics": [{"type": "Pods", "pods": {
                "metric": {"name": "fleetserve_queue_depth"},
                "target": {"type": "AverageValue",
                           "averageValue": f"{spec.autoscale.target_concurrency:g}"}}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": int(spec.autoscale.scale_down_cooldown_s)}}}}
    return None


def manifests(spec: DeploymentSpec) -> list[dict[str, Any]]:
    """Secret, Deployment, Service (+ autoscaler) for kubectl. Secrets are `${HF_TOKEN}` /
    `${FLEETSERVE_API_KEY}` placeholders (fill them with envsubst); an empty one means "not set"."""
    opts = options(spec)
    scaled = opts.autoscaler != "none"
    out = [secret_manifest(spec, "${HF_TOKEN}", "${FLEETSERVE_API_KEY}"),
           deployment_manifest(spec, replicas=None if scaled else spec.replicas.min),
           service_manifest(spec)]
    if (auto := autoscaler_manifest(spec)) is not None:
        out.append(auto)
    return out


def to_yaml(objects: list[dict[str, Any]]) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data) -> bool:  # shared label dicts are written out, not as &anchors
            return True

    return "".join("---\n" + yaml.dump(o, Dumper=Dumper, sort_keys=False) for o in objects)


# ---------------------------------------------------------------------------------------------- provider

def _replica_name(spec_name: str, replica_id: str) -> str:
    suffix = replica_id.rsplit("-", 1)[-1]
    return f"fleetserve-{spec_name}"[: 62 - len(suffix)].rstrip("-") + f"-{suffix}"


class KubernetesProvider:
    """Replicas on a cluster through the official `kubernetes` client (blocking calls run in threads)."""

    name = "kubernetes"

    def __init__(self, api_client=None, internal_key: str | None = None):
        try:
            from kubernetes import client
        except ImportError:
            raise RuntimeError("the kubernetes provider needs the `kubernetes` package: "
                               "pip install 'fleetserve[kubernetes]'") from None

        self.api = api_client or self._load_api_client()
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.internal_key = internal_key
        self._namespace: dict[str, str] = {}  # replica id -> namespace (for replicas started here)

    @staticmethod
    def _load_api_client():
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config()
            except (config.ConfigException, OSError) as exc:
                raise RuntimeError(f"no Kubernetes cluster configured (neither in-cluster nor a kubeconfig): {exc}") \
                    from None
        return client.ApiClient()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.api.close)

    async def _call(self, fn, *args, **kw):
        return await asyncio.to_thread(fn, *args, **kw)

    async def apply(self, obj: dict[str, Any]) -> None:
        """Server-side apply: the object as fleetserve wants it; fields others manage are left alone."""
        kind, meta = obj["kind"], obj["metadata"]
        fn = {"Deployment": self.apps.patch_namespaced_deployment, "Service": self.core.patch_namespaced_service,
              "Secret": self.core.patch_namespaced_secret}[kind]
        await self._call(fn, meta["name"], meta["namespace"], obj, field_manager=FIELD_MANAGER, force=True,
                         _content_type=APPLY)

    def _ns(self, r: ReplicaRow, spec: DeploymentSpec | None = None) -> str:
        if spec is not None:
            return options(spec).namespace
        return self._namespace.get(r.id) or (r.log_path or "").partition("/")[0] or "default"

    async def start(self, spec: DeploymentSpec, replica_id: str, generation: int) -> ReplicaRow:
        if options(spec).autoscaler != "none":
            raise ValueError("kubernetes.autoscaler is for the --dry-run manifests (kubectl); on the platform, "
                             "fleetserve's own autoscaler scales replicas between replicas.min and replicas.max")
        token = spec.hf_token.get_secret_value() if spec.hf_token else None
        await self.apply(secret_manifest(spec, token, self.internal_key))
        await self.apply(service_manifest(spec))
        name = _replica_name(spec.name, replica_id)
        await self.apply(deployment_manifest(spec, name=name, replicas=1,
                                             extra_labels={"fleetserve.dev/replica": replica_id}))
        ns = options(spec).namespace
        self._namespace[replica_id] = ns
        # log_path holds "<namespace>/<k8s deployment name>": where the replica lives, for a restarted control plane
        return ReplicaRow(replica_id, spec.name, generation, PORT, None, None, "starting", time.time(), f"{ns}/{name}")

    def _where(self, r: ReplicaRow) -> tuple[str, str]:
        ns, _, name = (r.log_path or "").partition("/")
        return ns or self._namespace.get(r.id, "default"), name or _replica_name(r.deployment, r.id)

    async def _pods(self, r: ReplicaRow) -> list:
        ns, _ = self._where(r)
        res = await self._call(self.core.list_namespaced_pod, ns, label_selector=f"fleetserve.dev/replica={r.id}")
        return list(res.items or [])

    async def observe(self, r: ReplicaRow) -> Liveness:
        from kubernetes.client.exceptions import ApiException

        ns, name = self._where(r)
        try:
            dep = await self._call(self.apps.read_namespaced_deployment, name, ns)
        except ApiException as exc:
            if exc.status == 404:  # deleted (drained): alive while its pod is still terminating
                try:
                    return Liveness(bool(await self._pods(r)), None, f"Kubernetes deployment {ns}/{name} is gone")
                except ApiException:
                    return Liveness(False, None, f"Kubernetes deployment {ns}/{name} is gone")
            log.warning("cannot read Kubernetes deployment %s/%s: %s", ns, name, exc.reason)
            return Liveness(True)
        for cond in (dep.status.conditions if dep.status else None) or []:
            if cond.type == "Progressing" and cond.status == "False":
                return Liveness(False, None, f"{cond.reason}: {cond.message}")
        try:
            pods = await self._pods(r)
        except ApiException:
            return Liveness(True)
        for pod in pods:
            for cs in (pod.status.container_statuses if pod.status else None) or []:
                waiting = cs.state.waiting if cs.state else None
                if waiting is not None and waiting.reason in FAILING_WAITS:
                    last = cs.last_state.terminated if cs.last_state else None
                    extra = f" (last exit {last.exit_code}: {last.reason})" if last is not None else ""
                    return Liveness(False, last.exit_code if last else None,
                                    f"pod {pod.metadata.name}: {waiting.reason}: {waiting.message or ''}{extra}".strip())
        return Liveness(True)

    async def ready(self, r: ReplicaRow, client: httpx.AsyncClient) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            pods = await self._pods(r)
        except ApiException:
            return False
        for pod in pods:
            conds = {c.type: c.status for c in (pod.status.conditions or [])} if pod.status else {}
            ip = pod.status.pod_ip if pod.status else None
            if conds.get("Ready") != "True" or not ip or pod.metadata.deletion_timestamp is not None:
                continue
            url = f"http://{ip}:{PORT}"
            try:
                resp = await client.get(f"{url}/readyz", timeout=5.0)
            except httpx.HTTPError:
                return False
            if resp.status_code == 200:
                r.url, r.port = url, PORT
                return True
        return False

    async def stop(self, r: ReplicaRow, force: bool = False) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        ns, name = self._where(r)
        try:
            await self._call(self.apps.delete_namespaced_deployment, name, ns,
                             body=client.V1DeleteOptions(propagation_policy="Background"))
        except ApiException as exc:
            if exc.status != 404:
                log.warning("deleting Kubernetes deployment %s/%s failed: %s", ns, name, exc.reason)
        if force:
            try:
                for pod in await self._pods(r):
                    await self._call(self.core.delete_namespaced_pod, pod.metadata.name, ns,
                                     body=client.V1DeleteOptions(grace_period_seconds=0))
            except ApiException as exc:
                if exc.status != 404:
                    log.warning("deleting pods of %s failed: %s", r.id, exc.reason)

    async def release(self, r: ReplicaRow) -> None:
        """The replica is gone for the platform (crashed, failed, drained): make sure nothing of it stays."""
        from kubernetes.client.exceptions import ApiException

        ns, name = self._where(r)
        try:
            await self._call(self.apps.read_namespaced_deployment, name, ns)
        except ApiException:
            pass  # already deleted (the usual case after a drain)
        else:
            await self.stop(r, force=True)
        self._namespace.pop(r.id, None)

    async def logs(self, r: ReplicaRow, tail: int) -> list[str]:
        from kubernetes.client.exceptions import ApiException

        ns, _ = self._where(r)
        try:
            lines: list[str] = []
            for pod in await self._pods(r):
                text = await self._call(self.core.read_namespaced_pod_log, pod.metadata.name, ns,
                                        container=CONTAINER, tail_lines=tail)
                lines += text.splitlines()
            return lines[-tail:]
        except ApiException as exc:
            return [f"(logs unavailable: {exc.status} {exc.reason})"]

    def log_file(self, r: ReplicaRow) -> Path | None:
        return None
