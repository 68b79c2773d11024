"""The planner's data: the spec it reads and the plan it returns (plain, JSON-ready)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fleetserve.config import none_words, normalise_choice

Backend = Literal["native", "sglang", "vllm"]
Role = Literal["unified", "prefill", "decode", "router"]

SPEC_DEFAULTS = {"num_steps": 2, "eagle_topk": 6, "num_draft_tokens": 10}  # seed 002's starting point
PD_GPU_COUNTS = (2, 4, 8)
DEFAULT_BOOTSTRAP_PORT = 8998
DEFAULT_ENGINE_PORT = 30000


class PlanError(ValueError):
    """No plan is possible; the message says why and what would work."""


class PlanSpec(BaseModel):
    """What the user asked for. Field names follow the deployment spec (DESIGN.md "Names")."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field("default", min_length=1)
    revision: str | None = None
    served_model_name: str | None = None
    backend: Backend = "native"
    tp_size: int | None = Field(None, ge=1, le=64)
    precision: Literal["auto", "fp32", "bf16", "fp16", "fp8"] = "auto"
    quantization: str | None = None  # seed 000: passed to the engine as is (awq, gptq, fp8, ...)
    kv_cache_dtype: str | None = None  # auto | fp8_e5m2 | fp8_e4m3 | bf16 ...; None = decided by precision
    max_model_len: int | None = Field(None, ge=16)
    max_total_tokens: int | None = Field(None, ge=16)  # KV pool size in tokens (SGLang's meaning)
    mem_fraction_static: float | None = Field(None, gt=0, lt=1)
    schedule_conservativeness: float | None = Field(None, gt=0)
    max_queued_requests: int | None = Field(None, ge=1)
    enable_metrics: bool = True
    enable_p2p_check: bool = False
    enable_torch_compile: bool = False
    h100_only: bool = False
    auto_use_fp8_on_h100: bool = True
    pd: Literal["auto", "on", "off"] = "auto"
    pd_bootstrap_port: int = Field(DEFAULT_BOOTSTRAP_PORT, ge=1, le=65535)
    pd_ib_device: str | None = None
    pd_transfer_backend: str | None = None
    speculative: Literal["none", "eagle", "eagle3", "ngram"] = "none"
    speculative_num_steps: int | None = Field(None, ge=1)
    speculative_eagle_topk: int | None = Field(None, ge=1)
    speculative_num_draft_tokens: int | None = Field(None, ge=1)
    speculative_token_map: str | None = None
    speculative_attention_mode: Literal["prefill", "decode"] | None = None
    speculative_draft_model_path: str | None = None
    host: str = "127.0.0.1"  # fleetserve's own address (the engines bind engine_host)
    port: int = Field(8000, ge=1, le=65535)
    engine_host: str = "127.0.0.1"
    engine_port: int = Field(DEFAULT_ENGINE_PORT, ge=1, le=65000)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    python: str = "python3"  # interpreter in the generated command lines
    gpu_type: str | None = None  # plan for a machine with these GPUs instead of detecting this one
    gpu_count: int | None = Field(None, ge=1, le=64)

    @field_validator("precision", "speculative", "log_level", "pd", "speculative_attention_mode", mode="before")
    @classmethod
    def _lower(cls, value: Any, info) -> Any:
        return normalise_choice(info.field_name, value)

    @field_validator("kv_cache_dtype", "quantization", mode="before")
    @classmethod
    def _none_words(cls, value: Any) -> Any:
        return none_words(value)

    @field_validator("tp_size", "max_model_len", "max_total_tokens", "max_queued_requests", "port", "engine_port",
                     "pd_bootstrap_port", "speculative_num_steps", "speculative_eagle_topk",
                     "speculative_num_draft_tokens", "gpu_count", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("expected an integer, got a boolean")  # noqa: TRY004 (pydantic needs ValueError)
        return value


@dataclass
class Decision:
    """One automatic (or explicit) choice and why it was made."""

    setting: str
    value: Any
    reason: str


@dataclass
class Process:
    name: str
    role: Role
    gpus: list[int]
    tp_size: int | None
    port: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    bootstrap_port: int | None = None
    host: str = "127.0.0.1"
    ready_path: str = "/health"  # GET answers 200 once the process serves (SGLang, its router, vLLM)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def command(self) -> str:
        """One shell line: env assignments, then the quoted argv."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.argv)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "gpus": self.gpus,
                "cuda_visible_devices": self.env.get("CUDA_VISIBLE_DEVICES"), "tp_size": self.tp_size,
                "host": self.host, "port": self.port, "url": self.url, "bootstrap_port": self.bootstrap_port,
                "argv": self.argv, "env": self.env, "command": self.command, "ready_path": self.ready_path}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Process:
        return cls(name=d["name"], role=d["role"], gpus=list(d.get("gpus") or []), tp_size=d.get("tp_size"),
                   port=int(d["port"]), argv=list(d["argv"]), env=dict(d.get("env") or {}),
                   bootstrap_port=d.get("bootstrap_port"), host=d.get("host", "127.0.0.1"),
                   ready_path=d.get("ready_path", "/health"))


@dataclass
class MemoryCheck:
    role: str
    tp_size: int
    gpu_memory_gib: float
    usable_gib: float
    weights_gib: float  # per GPU
    kv_gib: float  # per GPU, for `kv_tokens`
    kv_tokens: int
    kv_capacity_tokens: int  # tokens the rest of the usable memory would hold

    @property
    def fits(self) -> bool:
        return self.weights_gib + self.kv_gib <= self.usable_gib

    def describe(self) -> str:
        return (f"weights {self.weights_gib:.1f} GiB/GPU + KV cache for {self.kv_tokens} tokens "
                f"{self.kv_gib:.1f} GiB/GPU = {self.weights_gib + self.kv_gib:.1f} GiB of {self.usable_gib:.1f} GiB "
                f"usable per GPU ({self.gpu_memory_gib:.1f} GiB GPU)")

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "tp_size": self.tp_size, "gpu_memory_gib": round(self.gpu_memory_gib, 2),
                "usable_gib": round(self.usable_gib, 2), "weights_gib": round(self.weights_gib, 2),
                "kv_gib": round(self.kv_gib, 2), "kv_tokens": self.kv_tokens,
                "kv_capacity_tokens": self.kv_capacity_tokens, "fits": self.fits}


@dataclass
class EngineSettings:
    """Everything the command-line builders need, already decided."""

    model: str
    revision: str | None
    served_model_name: str | None
    dtype: str | None  # engine dtype name (bfloat16, float16, float32) or None for the model's own
    precision: str  # resolved: fp8 | bf16 | fp16 | fp32
    quantization: str | None
    kv_cache_dtype: str | None
    max_model_len: int
    max_total_tokens: int | None
    mem_fraction_static: float | None
    schedule_conservativeness: float | None
    max_queued_requests: int | None
    enable_metrics: bool
    enable_p2p_check: bool
    enable_torch_compile: bool
    log_level: str
    host: str
    python: str
    speculative: str  # none | eagle | eagle3 | ngram
    speculative_num_steps: int | None = None
    speculative_eagle_topk: int | None = None
    speculative_num_draft_tokens: int | None = None
    speculative_token_map: str | None = None
    speculative_attention_mode: str | None = None
    speculative_draft_model_path: str | None = None
    pd_ib_device: str | None = None
    pd_transfer_backend: str | None = None


@dataclass
class Plan:
    backend: Backend
    model: str
    hardware: dict[str, Any]
    model_info: dict[str, Any]
    settings: EngineSettings
    mode: Literal["unified", "pd"]
    processes: list[Process]
    entry_url: str  # where fleetserve sends requests (the router in PD mode)
    pd_bootstrap_port: int | None
    memory: list[MemoryCheck]
    decisions: list[Decision]
    warnings: list[str]

    @property
    def pd_mode(self) -> bool:
        return self.mode == "pd"

    def by_role(self, role: str) -> list[Process]:
        return [p for p in self.processes if p.role == role]

    def to_dict(self) -> dict[str, Any]:
        s = self.settings
        return {
            "backend": self.backend, "model": self.model, "mode": self.mode, "pd_mode": self.pd_mode,
            "pd_bootstrap_port": self.pd_bootstrap_port, "entry_url": self.entry_url,
            "precision": s.precision, "dtype": s.dtype, "quantization": s.quantization,
            "kv_cache_dtype": s.kv_cache_dtype, "max_model_len": s.max_model_len,
            "speculative": None if s.speculative == "none" else {
                "algorithm": s.speculative, "num_steps": s.speculative_num_steps, "eagle_topk": s.speculative_eagle_topk,
                "num_draft_tokens": s.speculative_num_draft_tokens, "token_map": s.speculative_token_map,
                "attention_mode": s.speculative_attention_mode, "draft_model_path": s.speculative_draft_model_path},
            "processes": [p.to_dict() for p in self.processes],
            "memory": [m.to_dict() for m in self.memory],
            "decisions": [{"setting": d.setting, "value": d.value, "reason": d.reason} for d in self.decisions],
            "warnings": list(self.warnings),
            "hardware": self.hardware, "model_info": self.model_info,
        }
