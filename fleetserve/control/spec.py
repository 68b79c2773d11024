"""The deployment spec (what the user asks for) and the deployment object (what the API returns).

One set of field names everywhere (API, CLI, console). A field the platform cannot honour yet is
rejected with 422 rather than silently ignored.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from fleetserve.control.autoscaler import AutoscalePolicy

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

# engine_args a deployment may pass to its workers (fleetserve serve options)
ENGINE_ARGS = {"max_batch_tokens", "max_running_seqs", "kv_cache_tokens", "block_size", "max_queue_len"}


class Replicas(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min: int = Field(1, ge=0, le=64)
    max: int = Field(1, ge=1, le=64)

    @model_validator(mode="after")
    def _order(self) -> Replicas:
        if self.max < max(self.min, 1):
            raise ValueError(f"replicas.max ({self.max}) must be >= replicas.min ({self.min}) and >= 1")
        return self


class DeploymentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="DNS label: lowercase letters, digits and '-', at most 63 characters")
    model: str = Field("default", min_length=1, description="'default', a Hugging Face Hub id, or a local path")
    revision: str | None = None
    hf_token: SecretStr | None = Field(None, description="write-only; stored encrypted, never returned")
    backend: Literal["native"] = "native"
    provider: Literal["local"] = "local"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    max_model_len: int | None = Field(None, ge=16)
    replicas: Replicas = Field(default_factory=Replicas)
    autoscale: AutoscalePolicy = Field(default_factory=AutoscalePolicy)
    engine_args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must be a DNS label: 1-63 lowercase letters, digits or '-', starting and ending "
                             "with a letter or digit")
        return v

    @field_validator("engine_args")
    @classmethod
    def _engine_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - ENGINE_ARGS)
        if unknown:
            raise ValueError(f"unsupported engine_args {unknown}; allowed: {sorted(ENGINE_ARGS)}")
        for k, val in v.items():
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"engine_args.{k} must be a positive integer")
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
