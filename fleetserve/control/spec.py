"""The deployment spec (what the user asks for) and the deployment object (what the API returns).

One set of field names everywhere (API, CLI, console). A field the platform cannot honour yet is
rejected with 422 rather than silently ignored.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from fleetserve.control.autoscaler import AutoscalePolicy

# Hathora's regions (the provider validates `region` against them); kept here so the spec needs no provider import
HATHORA_REGIONS = ("Seattle", "Los_Angeles", "Washington_DC", "Chicago", "London", "Frankfurt", "Mumbai", "Singapore",
                   "Tokyo", "Sydney", "Sao_Paulo", "Dallas", "Johannesburg", "Dubai")
# fields only a cloud provider honours: the local provider rejects them rather than ignoring them
CLOUD_FIELDS = {"region": ("hathora",), "image": ("hathora", "kubernetes"), "cpu": ("hathora", "kubernetes"),
                "memory_mb": ("hathora", "kubernetes"), "gpu": ("hathora", "kubernetes"),
                "kubernetes": ("kubernetes",)}

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

# engine_args a deployment may pass to its workers (fleetserve serve options): int = a positive integer,
# str = a non-empty string, a tuple = one of those values
ENGINE_ARGS: dict[str, Any] = {
    "max_batch_tokens": int, "max_running_seqs": int, "kv_cache_tokens": int, "block_size": int, "max_queue_len": int,
    "tp_size": int, "quantization": ("fp8",), "kv_cache_dtype": ("auto", "fp8", "fp8_e4m3", "fp8_e5m2"),
    "attention_backend": ("auto", "torch", "cpu", "triton"), "speculative": ("none", "ngram", "eagle"),
    "speculative_num_steps": int, "speculative_draft_model_path": str,
}
# ... and those the sglang / vllm backends honour (the KV pool size, the queue limit)
REMOTE_ENGINE_ARGS = {"kv_cache_tokens", "max_queue_len"}
# backends each provider can start: a remote backend's replica is `fleetserve serve --backend B` on this
# machine's GPUs; the cloud providers run the native images only, for now
PROVIDER_BACKENDS = {"local": ("native", "sglang", "vllm"), "hathora": ("native",), "kubernetes": ("native",)}


class Replicas(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min: int = Field(1, ge=0, le=64)
    max: int = Field(1, ge=1, le=64)

    @model_validator(mode="after")
    def _order(self) -> Replicas:
        if self.max < max(self.min, 1):
            raise ValueError(f"replicas.max ({self.max}) must be >= replicas.min ({self.min}) and >= 1")
        return self


class GPU(BaseModel):
    """GPUs per replica: Kubernetes `nvidia.com/gpu` limits, Hathora `requestedGPU`."""

    model_config = ConfigDict(extra="forbid")

    type: str | None = Field(None, min_length=1, description="GPU model, e.g. H100 (informational for providers)")
    count: int = Field(1, ge=1, le=16)


class KubernetesOptions(BaseModel):
    """Kubernetes-only settings (provider `kubernetes`)."""

    model_config = ConfigDict(extra="forbid")

    namespace: str = Field("default", description="namespace of the deployment's objects (DNS label)")
    autoscaler: Literal["none", "hpa", "keda"] = Field(
        "none", description="manifests printed by --dry-run: none: fixed replicas.min; hpa: a HorizontalPodAutoscaler "
                            "on the fleetserve_queue_depth pods metric; keda: a KEDA ScaledObject on "
                            "fleetserve_queue_depth from Prometheus (target: autoscale.target_concurrency per pod)")
    prometheus_url: str = Field("http://prometheus-server.monitoring.svc:80",
                                description="Prometheus that scrapes the pods (keda only)")
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    model_cache_claim: str | None = Field(None, description="PersistentVolumeClaim for the model cache; "
                                                            "None: an emptyDir per pod")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must be a DNS label: 1-63 lowercase letters, digits or '-'")
        return v


class DeploymentSpec(BaseModel):
    # no NaN/Infinity: JSON cannot store them, so a spec holding one could not be read back from the store
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(description="DNS label: lowercase letters, digits and '-', at most 63 characters")
    model: str = Field("default", min_length=1, description="'default', a Hugging Face Hub id, or a local path")
    revision: str | None = None
    hf_token: SecretStr | None = Field(None, description="write-only; stored encrypted, never returned")
    backend: Literal["native", "sglang", "vllm"] = Field(
        "native", description="native: fleetserve's engine; sglang / vllm: that engine on the machine's NVIDIA GPUs, "
                              "planned by the worker (provider local, one replica per machine, a Hugging Face model)")
    provider: Literal["local", "hathora", "kubernetes"] = "local"
    region: str | None = Field(None, validate_default=True, description="Hathora region (provider hathora): " + ", ".join(HATHORA_REGIONS))
    image: str | None = Field(None, min_length=1, description="container image (cloud providers); default: "
                                                              "fleetserve's own image for the backend")
    cpu: float | None = Field(None, gt=0, le=64, description="CPU cores per replica (cloud providers)")
    memory_mb: int | None = Field(None, ge=512, le=1 << 20, description="memory per replica in MB (cloud providers)")
    gpu: GPU | None = None
    kubernetes: KubernetesOptions | None = None
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    max_model_len: int | None = Field(None, ge=16)
    replicas: Replicas = Field(default_factory=Replicas)
    autoscale: AutoscalePolicy = Field(default_factory=AutoscalePolicy)
    engine_args: dict[str, Any] = Field(default_factory=dict, description=(
        "options for every replica's engine (fleetserve serve options): " + ", ".join(ENGINE_ARGS)
        + "; with sglang / vllm only " + ", ".join(sorted(REMOTE_ENGINE_ARGS))))

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must be a DNS label: 1-63 lowercase letters, digits or '-', starting and ending "
                             "with a letter or digit")
        return v

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str, info) -> str:
        if v != "native" and info.data.get("model") == "default":
            raise ValueError(f"backend {v} serves a Hugging Face model (a Hub id or a local HF directory); 'default' "
                             "is the native engine's embedded GGUF model")
        return v

    @field_validator("provider")
    @classmethod
    def _provider(cls, v: str, info) -> str:
        backend = info.data.get("backend")
        if backend is not None and backend not in PROVIDER_BACKENDS[v]:
            raise ValueError(f"provider {v} runs the native backend only (its images); backend {backend} needs "
                             "provider local")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str, info) -> str:
        backend = info.data.get("backend")
        if backend not in (None, "native") and v not in ("auto", "cuda"):
            raise ValueError(f"backend {backend} runs on CUDA GPUs: device must be auto or cuda, not {v!r}")
        return v

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, v: Replicas, info) -> Replicas:
        backend = info.data.get("backend")
        if backend not in (None, "native") and v.max > 1:
            raise ValueError(f"backend {backend} runs one replica per machine (each takes all of its GPUs): "
                             f"replicas.max must be 1, not {v.max}")
        return v

    @field_validator("region")
    @classmethod
    def _region(cls, v: str | None) -> str | None:
        if v is None:
            return v
        by_lower = {r.lower(): r for r in HATHORA_REGIONS}
        if v.lower() not in by_lower:
            raise ValueError(f"unknown region {v!r}; one of {', '.join(HATHORA_REGIONS)}")
        return by_lower[v.lower()]

    @field_validator(*CLOUD_FIELDS)
    @classmethod
    def _cloud_only(cls, v: Any, info) -> Any:
        provider = info.data.get("provider")  # absent when the provider itself was invalid
        if provider is None:
            return v
        if v is not None and provider not in CLOUD_FIELDS[info.field_name]:
            raise ValueError(f"{info.field_name} is only supported with provider "
                             f"{' or '.join(CLOUD_FIELDS[info.field_name])}, not {provider!r}")
        if info.field_name == "region" and v is None and provider == "hathora":
            raise ValueError(f"region is required with provider hathora; one of {', '.join(HATHORA_REGIONS)}")
        return v

    @field_validator("engine_args")
    @classmethod
    def _engine_args(cls, v: dict[str, Any], info) -> dict[str, Any]:
        backend = info.data.get("backend") or "native"
        allowed = ENGINE_ARGS if backend == "native" else REMOTE_ENGINE_ARGS
        unknown = sorted(set(v) - set(allowed))
        if unknown:
            raise ValueError(f"unsupported engine_args {unknown} with backend {backend}; allowed: {sorted(allowed)}")
        for k, val in v.items():
            kind = ENGINE_ARGS[k]
            if kind is int and (not isinstance(val, int) or isinstance(val, bool) or val < 1):
                raise ValueError(f"engine_args.{k} must be a positive integer")
            if kind is str and (not isinstance(val, str) or not val.strip()):
                raise ValueError(f"engine_args.{k} must be a non-empty string")
            if isinstance(kind, tuple) and val not in kind:
                raise ValueError(f"engine_args.{k} must be one of {', '.join(kind)}")
        if v.get("speculative") == "eagle" and not v.get("speculative_draft_model_path"):
            raise ValueError("engine_args.speculative eagle needs engine_args.speculative_draft_model_path")
        return v

    def public(self) -> dict[str, Any]:
        """The spec as the API shows it: the token is never returned, only whether one is set."""
        d = self.model_dump(exclude={"hf_token"})
        d["hf_token_set"] = self.hf_token is not None
        return d


class ReplicasPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min: int | None = Field(None, ge=0, le=64)
    max: int | None = Field(None, ge=1, le=64)


class DeploymentPatch(BaseModel):
    """PATCH body: what may change on a running deployment (a rolling update)."""

    model_config = ConfigDict(extra="forbid")

    replicas: ReplicasPatch | None = None
    autoscale: AutoscalePolicy | None = None
    engine_args: dict[str, Any] | None = None


Status = Literal["pending", "starting", "running", "updating", "scaling", "scaled_to_zero", "failed", "deleting"]


class ReplicaView(BaseModel):
    id: str
    url: str | None
    pid: int | None
    status: str
    started_at: float | None
    generation: int


class DeploymentView(BaseModel):
    name: str
    status: Status
    message: str
    ready_replicas: int
    desired_replicas: int
    replicas: list[ReplicaView]
    endpoint: str
    spec: dict[str, Any]
    created_at: float
    updated_at: float
