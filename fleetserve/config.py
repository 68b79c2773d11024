"""Configuration of one worker (`fleetserve serve`) and where each value came from.

Values are merged from plain dicts, lowest precedence first, and validated once by pydantic. Merging
by hand (rather than pydantic-settings' sources) keeps provenance exact: every field knows the one
source that set it, so an error can name it and `--print-config` can show it.

Precedence, highest first: CLI > ``FLEETSERVE_<FIELD>`` > seed env names (``PORT``, ``MODEL_PATH``, ``TP_SIZE``,
...) > ``HATHORA_DEFAULT_PORT`` (port only) > ``DEPLOYMENT_CONFIG_JSON`` > YAML file > defaults.

`backend` picks the engine: ``native`` (fleetserve's own) or ``sglang`` / ``vllm`` (launched from a plan, see
`fleetserve.planner.serve`). Settings only one side can honour are rejected, with the reason, when the other
side is chosen (`check_backend`), rather than ignored.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

BLOCK_SIZES = (8, 16, 32, 64, 128)
SECRET_FIELDS = frozenset({"hf_token", "api_keys"})
MIN_API_KEY_LEN = 8  # shorter keys are guessable, and too short to be redacted from logs safely
DEFAULT_MAX_BODY_BYTES = 4 << 20  # 4 MiB

# Fields that only the platform sets, through its own env vars; no other source may set them.
ENV_ONLY = {
    "hathora_region": "HATHORA_REGION",
    "hathora_process_id": "HATHORA_PROCESS_ID",
    "hathora_hostname": "HATHORA_HOSTNAME",
}

# Seed env names (seeds 000-003) -> fleetserve field.
SEED_ENV = {
    "MODEL_PATH": "model",
    "PORT": "port",
    "LOG_LEVEL": "log_level",
    "MAX_TOTAL_TOKENS": "kv_cache_tokens",  # SGLang's meaning: KV pool size in tokens
    "HF_TOKEN": "hf_token",
    "HOST": "host",
    # GPU planning (seeds 001/002): read by the sglang / vllm backends
    "TP_SIZE": "tp_size",
    "H100_ONLY": "h100_only",
    "ENABLE_PD_DEFAULTS": "pd",  # true = auto (seed 002's conditions decide), false = off
    "DISAGG_BOOTSTRAP_PORT": "pd_bootstrap_port",
    "DISAGG_IB_DEVICE": "pd_ib_device",
    "DISAGG_TRANSFER_BACKEND": "pd_transfer_backend",
    "SPECULATIVE_ALGORITHM": "speculative",
    "SPECULATIVE_NUM_STEPS": "speculative_num_steps",
    "SPECULATIVE_EAGLE_TOPK": "speculative_eagle_topk",
    "SPECULATIVE_NUM_DRAFT_TOKENS": "speculative_num_draft_tokens",
    "SPECULATIVE_TOKEN_MAP": "speculative_token_map",
    "SPECULATIVE_ATTENTION_MODE": "speculative_attention_mode",
    "SPECULATIVE_DRAFT_MODEL_PATH": "speculative_draft_model_path",
}

# Extra FLEETSERVE_* names (beside FLEETSERVE_<FIELD>), applied after the generic ones.
FLEETSERVE_ENV_ALIASES = {
    "FLEETSERVE_API_KEY": "api_keys",  # one key, or several separated by commas
}

# Seed 000's DEPLOYMENT_CONFIG_JSON keys -> fleetserve field.
SEED_JSON_KEYS = {
    "model_id": "model",
    "model_path": "model",
    "dtype": "precision",
    "max_total_tokens": "kv_cache_tokens",
    "max_queued_requests": "max_queue_len",
}

# Deployment-spec keys a single worker cannot honour: rejected loudly rather than silently ignored.
NOT_SUPPORTED_YET = {
    "gpu": "`fleetserve serve` uses the GPUs it finds (limit them with CUDA_VISIBLE_DEVICES); `gpu` describes "
           "another machine to `fleetserve plan --gpu-type`",
    "replicas": "replicas belong to a deployment (`fleetserve deploy`), not to one worker",
    "autoscale": "autoscaling belongs to a deployment (`fleetserve deploy`), not to one worker",
    "region": "regions belong to a deployment (`fleetserve deploy --provider hathora --region`)",
    "image": "images belong to a deployment (`fleetserve deploy --image`)",
}

# Files may use the deployment spec's nested objects for these (DESIGN.md "Names").
NESTED = {
    "speculative": {"algorithm": "speculative", "num_steps": "speculative_num_steps",
                    "eagle_topk": "speculative_eagle_topk", "num_draft_tokens": "speculative_num_draft_tokens",
                    "token_map": "speculative_token_map", "attention_mode": "speculative_attention_mode",
                    "draft_model_path": "speculative_draft_model_path"},
    "pd": {"enabled": "pd", "bootstrap_port": "pd_bootstrap_port", "ib_device": "pd_ib_device",
           "transfer_backend": "pd_transfer_backend"},
}

REMOTE_BACKENDS = ("sglang", "vllm")
# Settings of the sglang / vllm engines (read by the planner) and the values the native engine honours
# trivially; any other value with the native backend is rejected. (tp_size is honoured by every backend: the
# native engine runs one process per rank, gloo on CPU, nccl on CUDA.)
GPU_FIELDS: dict[str, tuple[Any, ...]] = {
    "quantization": (None, "fp8"), "kv_cache_dtype": (None, "auto", "fp8", "fp8_e4m3", "fp8_e5m2"),
    "mem_fraction_static": (None,),
    "schedule_conservativeness": (None,), "enable_metrics": (True,), "enable_p2p_check": (False,),
    "enable_torch_compile": (False,), "h100_only": (False,), "auto_use_fp8_on_h100": (True, False),
    "pd": ("auto", "off"), "pd_bootstrap_port": (None,), "pd_ib_device": (None,), "pd_transfer_backend": (None,),
    # the native engine speculates with n-gram lookup or an EAGLE-1 head (top-1 chains): any num_steps /
    # num_draft_tokens / draft_model_path; eagle3, tree top-k, token maps and attention modes are sglang/vllm's
    "speculative": ("none", "ngram", "eagle"), "speculative_eagle_topk": (None, 1),
    "speculative_token_map": (None,), "speculative_attention_mode": (None,), "engine_port": (None,),
}
# Settings of the native engine and its batch API (which the sglang / vllm front does not serve) and the
# values a remote backend honours; any other value set explicitly with sglang / vllm is rejected.
NATIVE_FIELDS: dict[str, tuple[Any, ...]] = {
    "device": ("auto", "cuda"), "max_batch_tokens": (), "max_running_seqs": (), "block_size": (),
    "kv_cache_memory": (), "enable_prefix_caching": (True,), "attention_backend": ("auto",), "max_batch_size": (), "max_new_tokens": (),
    "max_request_tokens": (),
}

# What each field accepts, for error messages.
ALLOWED = {
    "model": "'default', a local path (.gguf file or HF directory) or a Hub id org/name",
    "revision": "a branch, tag or commit of the Hub repo",
    "served_model_name": "a non-empty name",
    "backend": "one of native, sglang, vllm",
    "precision": "one of auto, fp32, bf16, fp16 (fp8 with the sglang and vllm backends)",
    "device": "one of auto, cpu, cuda, mps",
    "max_model_len": "a positive integer (tokens)",
    "max_batch_tokens": "a positive integer (tokens per engine step)",
    "max_running_seqs": "a positive integer",
    "kv_cache_tokens": "a positive integer (KV pool size in tokens)",
    "attention_backend": "one of auto, torch, cpu, triton",
    "kv_cache_memory": "a size like 2GiB, 512MiB, 1.5GB or a number of bytes (KV pool size in memory)",
    "block_size": "one of " + ", ".join(map(str, BLOCK_SIZES)),
    "max_queue_len": "a positive integer",
    "enable_prefix_caching": "true or false",
    "host": "an IP address or host name to bind",
    "port": "an integer from 1 to 65535",
    "log_level": "one of debug, info, warning, error (any case)",
    "hf_token": "a Hugging Face access token",
    "api_keys": f"API keys of at least {MIN_API_KEY_LEN} characters without spaces or commas "
                "(a list, or one string of comma-separated keys)",
    "cors_origins": "origins like https://app.example.com or http://localhost:3000 (scheme://host[:port], "
                    "no path), or * for any origin (a list, or one comma-separated string)",
    "max_body_bytes": "a positive integer (bytes)",
    "max_batch_size": "a positive integer (prompts per /generate or /loglikelihood request)",
    "max_new_tokens": "a positive integer (largest max_tokens of /generate)",
    "max_request_tokens": "a positive integer (prompt + new tokens summed over one batch request)",
    "metrics_auth": "true or false",
    "log_file": "a file path (its directory is created if missing)",
    "drain_timeout_s": "a number of seconds >= 0",
    "tp_size": "an integer from 1 to 64 (GPUs per engine; with the native engine on CPU, processes)",
    "quantization": "an engine quantization method (fp8, awq, gptq, ...)",
    "kv_cache_dtype": "a KV cache dtype (auto, fp8_e5m2, fp8_e4m3, bf16, ...)",
    "mem_fraction_static": "a fraction between 0 and 1 (of each GPU's memory for weights + KV cache)",
    "schedule_conservativeness": "a positive number (SGLang)",
    "enable_metrics": "true or false",
    "enable_p2p_check": "true or false",
    "enable_torch_compile": "true or false",
    "h100_only": "true or false",
    "auto_use_fp8_on_h100": "true or false",
    "pd": "one of auto, on, off",
    "pd_bootstrap_port": "an integer from 1 to 65535",
    "pd_ib_device": "RDMA device names, e.g. mlx5_0,mlx5_1",
    "pd_transfer_backend": "an SGLang disaggregation transfer backend (mooncake, nixl, ...)",
    "speculative": "one of none, eagle, eagle3, ngram",
    "speculative_num_steps": "a positive integer",
    "speculative_eagle_topk": "a positive integer",
    "speculative_num_draft_tokens": "a positive integer",
    "speculative_token_map": "a path or Hub file of the EAGLE token map",
    "speculative_attention_mode": "one of prefill, decode",
    "speculative_draft_model_path": "the draft model (Hub id or local path)",
    "engine_port": "an integer from 1 to 65000 (first port of the engine processes)",
    "hathora_region": "a string (set by Hathora)",
    "hathora_process_id": "a string (set by Hathora)",
    "hathora_hostname": "a string (set by Hathora)",
}

_PRECISION_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
                      "float8": "fp8"}
_LOG_LEVEL_ALIASES = {"warn": "warning"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def normalise_choice(field: str, value: Any) -> Any:
    """The spellings users write for enum-like settings (any case, aliases, booleans for pd); shared by
    ServeConfig and the planner's PlanSpec so both read a file or env the same way."""
    if isinstance(value, bool) and field == "pd":
        return "on" if value else "off"
    if not isinstance(value, str):
        return value
    value = value.strip().lower()
    if field == "precision":
        return _PRECISION_ALIASES.get(value, value)
    if field == "log_level":
        return _LOG_LEVEL_ALIASES.get(value, value)
    if field == "pd":
        return "on" if value in _TRUE else "off" if value in _FALSE else value
    if field == "speculative":
        return "none" if value in ("", "none", "null", "off", "false") else value
    return value


def none_words(value: Any) -> Any:
    """'', 'none' and 'null' mean unset (quantization, kv_cache_dtype)."""
    if isinstance(value, str):
        value = value.strip().lower()
        return None if value in ("", "none", "null") else value
    return value


_SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
               "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_size(text: str) -> int:
    """'2GiB' -> 2147483648; '1.5GB' -> 1500000000; '4096' -> 4096."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 2GiB, 512MiB, 1.5GB, 1048576)")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


class ConfigError(ValueError):
    """Invalid configuration; the message names the field, its source and what is allowed."""

    def __init__(self, message: str, field: str | None = None, source: str | None = None):
        super().__init__(message)
        self.field = field
        self.source = source


class ServeConfig(BaseModel):
    """Everything one worker needs. Construct via `load_serve_config` to honour env and files."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field("default", min_length=1)
    revision: str | None = None
    served_model_name: str | None = Field(None, min_length=1)  # None: the model's name, at load
    backend: Literal["native", "sglang", "vllm"] = "native"
    # auto: fp32 on CPU, bf16 on CUDA (native); FP8 on H100/H200, else bf16 (sglang, vllm: see the planner)
    precision: Literal["auto", "fp32", "bf16", "fp16", "fp8"] = "auto"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    max_model_len: int | None = Field(None, ge=1)  # None: the model's context length
    max_batch_tokens: int = Field(2048, ge=1)
    max_running_seqs: int = Field(64, ge=1)
    kv_cache_tokens: int | None = Field(None, ge=1)  # None: sized automatically
    kv_cache_memory: int | None = Field(None, ge=1)  # bytes; kv_cache_tokens wins when both are set
    attention_backend: Literal["auto", "torch", "cpu", "triton"] = "auto"
    block_size: int = 16
    max_queue_len: int = Field(256, ge=1)
    enable_prefix_caching: bool = True  # share KV blocks of common prompt prefixes between requests
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    hf_token: SecretStr | None = None
    api_keys: list[SecretStr] = Field(default_factory=list)  # empty: no route requires a key
    cors_origins: list[str] = Field(default_factory=list)  # empty: no cross-origin browser access
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1)
    max_batch_size: int = Field(64, ge=1)  # seed 004's caps for the batch API
    max_new_tokens: int = Field(1024, ge=1)
    max_request_tokens: int = Field(131072, ge=1)
    metrics_auth: bool = False  # True: /metrics requires a key too (when keys are configured)
    log_file: Path | None = None  # None: $FLEETSERVE_HOME/logs/worker-<port>.log
    drain_timeout_s: float = Field(30.0, ge=0)
    # The sglang / vllm backends (fleetserve.planner reads them; PlanSpec has the same names and meanings)
    tp_size: int | None = Field(None, ge=1, le=64)  # None: the largest the model and GPUs allow
    quantization: str | None = None
    kv_cache_dtype: str | None = None
    mem_fraction_static: float | None = Field(None, gt=0, lt=1)
    schedule_conservativeness: float | None = Field(None, gt=0)
    enable_metrics: bool = True
    enable_p2p_check: bool = False
    enable_torch_compile: bool = False
    h100_only: bool = False
    auto_use_fp8_on_h100: bool = True
    pd: Literal["auto", "on", "off"] = "auto"
    pd_bootstrap_port: int | None = Field(None, ge=1, le=65535)  # None: 8998
    pd_ib_device: str | None = None
    pd_transfer_backend: str | None = None
    speculative: Literal["none", "eagle", "eagle3", "ngram"] = "none"
    speculative_num_steps: int | None = Field(None, ge=1)
    speculative_eagle_topk: int | None = Field(None, ge=1)
    speculative_num_draft_tokens: int | None = Field(None, ge=1)
    speculative_token_map: str | None = None
    speculative_attention_mode: Literal["prefill", "decode"] | None = None
    speculative_draft_model_path: str | None = None
    engine_port: int | None = Field(None, ge=1, le=65000)  # None: 30000
    hathora_region: str | None = None
    hathora_process_id: str | None = None
    hathora_hostname: str | None = None

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return parse_size(value) if isinstance(value, str) else value

    @field_validator("precision", "device", "log_level", "backend", "pd", "speculative", "speculative_attention_mode",
                     mode="before")
    @classmethod
    def _lower(cls, value: Any, info) -> Any:
        return normalise_choice(info.field_name, value)

    @field_validator("quantization", "kv_cache_dtype", mode="before")
    @classmethod
    def _none_words(cls, value: Any) -> Any:
        return none_words(value)

    @field_validator("max_model_len", "max_batch_tokens", "max_running_seqs", "kv_cache_tokens", "block_size",
                     "max_queue_len", "port", "max_body_bytes", "tp_size", "pd_bootstrap_port", "engine_port",
                     "speculative_num_steps", "speculative_eagle_topk", "speculative_num_draft_tokens", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML `port: yes` must not become port 1
            raise ValueError("expected an integer, got a boolean")  # noqa: TRY004 (pydantic needs ValueError)
        return value

    @field_validator("block_size")
    @classmethod
    def _block_size(cls, value: int) -> int:
        if value not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {value}")
        return value

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        """One string (an env var) is a comma-separated list; blanks between commas are dropped."""
        if isinstance(value, (str, SecretStr)):
            value = value.get_secret_value() if isinstance(value, SecretStr) else value
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)):
            return [v.strip() if isinstance(v, str) else v for v in value]
        return value

    @field_validator("api_keys")
    @classmethod
    def _api_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for i, key in enumerate(keys):
            raw = key.get_secret_value()  # never put the key itself in the message
            if len(raw) < MIN_API_KEY_LEN:
                raise ValueError(f"API key #{i + 1} is {len(raw)} characters long; at least {MIN_API_KEY_LEN} "
                                 "are required")
            if any(c.isspace() or c == "," for c in raw):
                raise ValueError(f"API key #{i + 1} contains a space or a comma, which cannot be sent in a "
                                 "Bearer header or a comma-separated list")
        return keys

    @field_validator("cors_origins")
    @classmethod
    def _cors_origins(cls, origins: list[str]) -> list[str]:
        out = []
        for origin in origins:
            origin = origin.rstrip("/") if origin != "*" else origin
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(f"CORS origin {origin!r} is not scheme://host[:port] (e.g. https://app.example.com)"
                                 " or *")
            out.append(origin)
        return out

    @field_validator("log_file", mode="before")
    @classmethod
    def _log_file(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            return Path(value).expanduser() if value else None
        return value


_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s?#]+")


def fleetserve_home(env: Mapping[str, str] | None = None) -> Path:
    """Root of fleetserve's state: ``$FLEETSERVE_HOME`` or ``~/.fleetserve``."""
    value = (os.environ if env is None else env).get("FLEETSERVE_HOME")
    return Path(value).expanduser() if value else Path.home() / ".fleetserve"


def resolve_log_file(cfg: ServeConfig, env: Mapping[str, str] | None = None) -> Path:
    """The worker's log file: ``log_file`` if set, else ``$FLEETSERVE_HOME/logs/worker-<port>.log``."""
    if cfg.log_file is not None:
        return cfg.log_file
    return fleetserve_home(env) / "logs" / f"worker-{cfg.port}.log"


FIELDS: tuple[str, ...] = tuple(ServeConfig.model_fields)
SETTABLE: tuple[str, ...] = tuple(f for f in FIELDS if f not in ENV_ONLY)


def load_serve_config(
    cli: dict[str, Any],
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[ServeConfig, dict[str, str]]:
    """Merge every source by precedence and validate; returns the config and each field's source."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = dict.fromkeys(FIELDS, "default")

    def put(layer: Mapping[str, Any], source: str) -> None:
        for key, value in layer.items():
            values[key] = value
            sources[key] = source

    if any(k.startswith("HATHORA_") for k in env):
        put({"host": "0.0.0.0"}, "default (HATHORA_* set)")
    if config_file is not None:
        put(_read_yaml(Path(config_file)), f"yaml {config_file}")
    if (raw := _env(env, "DEPLOYMENT_CONFIG_JSON")) is not None:
        put(_read_deployment_json(raw), "DEPLOYMENT_CONFIG_JSON")
    if (port := _env(env, "HATHORA_DEFAULT_PORT")) is not None:
        put({"port": port}, "env HATHORA_DEFAULT_PORT")
    for name, field in SEED_ENV.items():
        if (value := _env(env, name)) is not None:
            if name == "ENABLE_PD_DEFAULTS":
                value = _pd_defaults(value)
            put({field: value}, f"env {name}")
    for field in SETTABLE:
        name = f"FLEETSERVE_{field.upper()}"
        if (value := _env(env, name)) is not None:
            put({field: value}, f"env {name}")
    for name, field in FLEETSERVE_ENV_ALIASES.items():
        if (value := _env(env, name)) is not None:
            put({field: value}, f"env {name}")
    put(_check_cli(cli), "cli")
    for field, name in ENV_ONLY.items():
        if (value := _env(env, name)) is not None:
            put({field: value}, f"env {name}")

    try:
        cfg = ServeConfig.model_validate(values)
    except ValidationError as exc:
        raise _explain(exc, values, sources) from None
    check_backend(cfg, sources)
    return cfg, sources


def check_backend(cfg: ServeConfig, sources: Mapping[str, str] | None = None) -> None:
    """Reject settings the chosen backend cannot honour (ConfigError naming the field, its source and why)."""
    sources = sources or {}

    def src(field: str) -> str:
        return sources.get(field, "default" if field not in cfg.model_fields_set else "config")

    if cfg.backend == "native":
        if cfg.precision == "fp8":
            raise ConfigError(f"precision 'fp8' (from {src('precision')}) needs --backend sglang or vllm; the "
                              "native engine runs one of auto, fp32, bf16, fp16 (FP8 weights: --quantization fp8)", "precision",
                              src("precision"))
        if cfg.speculative == "eagle" and not cfg.speculative_draft_model_path:
            raise ConfigError(f"speculative 'eagle' (from {src('speculative')}) needs --speculative-draft-model-path "
                              "(an EAGLE-1 head: config.json + fc and layers.0 tensors)", "speculative",
                              src("speculative"))
        if cfg.speculative == "eagle3":
            raise ConfigError(f"speculative 'eagle3' (from {src('speculative')}) is a setting of the sglang and vllm "
                              "backends; the native engine runs ngram and eagle (EAGLE-1 heads). Choose --backend "
                              "sglang or vllm, or --speculative ngram / eagle", "speculative", src("speculative"))
        for field, honoured in GPU_FIELDS.items():
            value = getattr(cfg, field)
            if value not in honoured:
                raise ConfigError(f"{field} {value!r} (from {src(field)}) is a setting of the sglang and vllm "
                                  "backends; the native engine cannot honour it. Choose --backend sglang or vllm "
                                  "(FLEETSERVE_BACKEND), or remove the setting", field, src(field))
        return
    for field, honoured in NATIVE_FIELDS.items():
        value = getattr(cfg, field)
        if field in cfg.model_fields_set and value not in honoured:
            raise ConfigError(f"{field} {value!r} (from {src(field)}) is a setting of the native engine; the "
                              f"{cfg.backend} backend cannot honour it"
                              + (" (it runs on CUDA GPUs: use device auto or cuda)" if field == "device" else "")
                              + ". Remove it, or use --backend native", field, src(field))


def _pd_defaults(value: str) -> str:
    v = value.strip().lower()
    if v in _TRUE:
        return "auto"
    if v in _FALSE:
        return "off"
    raise ConfigError(f"ENABLE_PD_DEFAULTS={value!r}: expected true (PD disaggregation when seed 002's conditions "
                      "hold) or false (one engine)", "pd", "env ENABLE_PD_DEFAULTS")


def _env(env: Mapping[str, str], name: str) -> str | None:
    """An env var's value; empty counts as unset (``HF_TOKEN=`` in a compose file means "none")."""
    value = env.get(name)
    return value if value is not None and value.strip() != "" else None


def _check_cli(cli: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in cli.items():
        if value is None:
            continue
        if key in ENV_ONLY:
            raise ConfigError(f"{key} cannot be set on the command line; it is read from {ENV_ONLY[key]} only",
                              key, "cli")
        if key not in SETTABLE:
            raise ConfigError(f"unknown option {key!r} (from cli); allowed: {', '.join(SETTABLE)}", key, "cli")
        out[key] = value
    return out


def _normalise_keys(data: Any, source: str, *, seed_keys: bool) -> dict[str, Any]:
    """Map a file's keys to field names; reject unknown and not-yet-supported keys with a clear message."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping of field names to values, got {type(data).__name__}",
                          None, source)
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in _expand_nested(data, source).items():
        if key in NOT_SUPPORTED_YET:
            raise ConfigError(f"field {key!r} (from {source}) is not supported yet by `fleetserve serve`: "
                              f"{NOT_SUPPORTED_YET[key]}; remove it (settings that cannot be honoured are rejected, "
                              "not ignored)", key, source)
        if key in ENV_ONLY:
            raise ConfigError(f"field {key!r} (from {source}) is read from {ENV_ONLY[key]} only", key, source)
        if key in SEED_JSON_KEYS:
            if not seed_keys:
                raise ConfigError(f"unknown field {key!r} (from {source}); use {SEED_JSON_KEYS[key]!r} instead",
                                  key, source)
            field = SEED_JSON_KEYS[key]
        elif key in SETTABLE:
            field = key
        else:
            raise ConfigError(f"unknown field {key!r} (from {source}); allowed: {', '.join(SETTABLE)}", key, source)
        if value is None:
            continue
        if field in out and out[field] != value:
            raise ConfigError(f"{source} sets {field} twice with different values ({origin[field]!r} and {key!r})",
                              field, source)
        out[field] = value
        origin[field] = key
    return out


def _expand_nested(data: dict, source: str) -> dict[str, Any]:
    """`speculative: {algorithm, ...}` and `pd: {enabled, ...}` objects -> their flat fields."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        if key not in NESTED or not isinstance(value, dict):
            out[key] = value
            continue
        for sub, sub_value in value.items():
            if sub not in NESTED[key]:
                raise ConfigError(f"unknown field {key}.{sub} (from {source}); allowed: "
                                  + ", ".join(f"{key}.{s}" for s in NESTED[key]), key, source)
            out[NESTED[key][sub]] = sub_value
    return out


def _read_deployment_json(raw: str) -> dict[str, Any]:
    source = "DEPLOYMENT_CONFIG_JSON"
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:  # the message has a position only, never the (secret-bearing) text
        raise ConfigError(f"{source} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}; "
                          "expected a JSON object", None, source) from None
    return _normalise_keys(data, source, seed_keys=True)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    source = f"yaml {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}", None, source) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}", None, source) from None
    return _normalise_keys(data if data is not None else {}, source, seed_keys=False)


def _explain(exc: ValidationError, values: Mapping[str, Any], sources: Mapping[str, str]) -> ConfigError:
    """One line per invalid field: the field, its value (secrets hidden), its source, what is allowed."""
    lines: list[str] = []
    first: tuple[str | None, str | None] = (None, None)
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else None
        source = sources.get(field, "default") if field else "config"
        if field is None:
            lines.append(f"invalid configuration: {err['msg']}")
            continue
        shown = "***" if field in SECRET_FIELDS else repr(values.get(field))
        allowed = ALLOWED.get(field, err["msg"])
        lines.append(f"invalid {field} {shown} (from {source}): expected {allowed}")
        if first == (None, None):
            first = (field, source)
    return ConfigError("\n".join(lines), *first)


def config_as_dict(cfg: ServeConfig, redact: bool = True) -> dict[str, Any]:
    """A JSON-ready dict; secrets become "***" (None when unset) unless ``redact=False``."""
    out = cfg.model_dump(mode="json")
    for field in SECRET_FIELDS:
        secret = getattr(cfg, field)
        if secret is None:
            out[field] = None
        elif isinstance(secret, list):
            out[field] = ["***" if redact else s.get_secret_value() for s in secret]
        else:
            out[field] = "***" if redact else secret.get_secret_value()
    return out


def render_config(cfg: ServeConfig, sources: Mapping[str, str]):
    """A rich Table of field, value and source; secrets are always shown as "***"."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="fleetserve serve configuration", title_justify="left")
    table.add_column("field", style="cyan", no_wrap=True)
    table.add_column("value")
    table.add_column("source", style="dim")
    shown = config_as_dict(cfg, redact=True)
    for field in FIELDS:
        value = shown[field]
        text = Text("unset", style="dim") if value is None else Text(str(value))
        table.add_row(field, text, sources.get(field, "default"))
    return table
