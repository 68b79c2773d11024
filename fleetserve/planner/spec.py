"""Build a PlanSpec from every source, with the source of each value.

Precedence (DESIGN.md "Config precedence"), highest first: CLI > ``FLEETSERVE_<FIELD>`` > seed env
names (``MODEL_PATH``, ``TP_SIZE``, ``ENABLE_PD_DEFAULTS``, ``DISAGG_*``, ``SPECULATIVE_*``, ...) >
``HATHORA_DEFAULT_PORT`` (port only) > ``DEPLOYMENT_CONFIG_JSON`` > YAML file > defaults.

Files may use the deployment spec's nested shapes: ``gpu: {type, count}``, ``speculative: {algorithm,
num_steps, eagle_topk, num_draft_tokens, token_map, attention_mode, draft_model_path}`` and
``pd: {enabled, bootstrap_port, ib_device, transfer_backend}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fleetserve import config
from fleetserve.planner.types import PlanSpec

FIELDS = tuple(PlanSpec.model_fields)

# The worker's seed env names and nested file shapes, read the planner's way: only the settings a plan uses,
# and MAX_TOTAL_TOKENS under SGLang's own name.
SEED_ENV = {env: {"kv_cache_tokens": "max_total_tokens"}.get(field, field) for env, field in config.SEED_ENV.items()}
SEED_ENV = {env: field for env, field in SEED_ENV.items() if field in FIELDS}
SEED_JSON_KEYS = {"model_id": "model", "model_path": "model", "dtype": "precision"}
SECRET_KEYS = {"hf_token"}  # accepted in files (seed 000), never part of the spec or the plan
_NESTED = {"gpu": {"type": "gpu_type", "count": "gpu_count"}, **config.NESTED}


class PlanConfigError(ValueError):
    """A setting that cannot be used; the message names the field, its source and what is allowed."""


def load_plan_spec(cli: Mapping[str, Any], config_file: Path | None = None,
                   env: Mapping[str, str] | None = None) -> tuple[PlanSpec, dict[str, str], str | None]:
    """(spec, source of every field, hf_token or None) from all sources by precedence."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = dict.fromkeys(FIELDS, "default")
    token: str | None = None

    def put(layer: Mapping[str, Any], source: str) -> None:
        for key, value in layer.items():
            values[key] = value
            sources[key] = source

    if any(k.startswith("HATHORA_") for k in env):
        put({"host": "0.0.0.0"}, "default (HATHORA_* set)")
    if config_file is not None:
        data, tok = _read_yaml(Path(config_file))
        put(data, f"yaml {config_file}")
        token = tok or token
    if (raw := _env(env, "DEPLOYMENT_CONFIG_JSON")) is not None:
        data, tok = _read_json(raw)
        put(data, "DEPLOYMENT_CONFIG_JSON")
        token = tok or token
    if (port := _env(env, "HATHORA_DEFAULT_PORT")) is not None:
        put({"port": port}, "env HATHORA_DEFAULT_PORT")
    for name, field in SEED_ENV.items():
        if (value := _env(env, name)) is not None:
            if name == "ENABLE_PD_DEFAULTS":
                value = _pd_defaults(value)
            put({field: value}, f"env {name}")
    for field in FIELDS:
        if (value := _env(env, f"FLEETSERVE_{field.upper()}")) is not None:
            put({field: value}, f"env FLEETSERVE_{field.upper()}")
    unknown = sorted(k for k, v in cli.items() if v is not None and k not in FIELDS)
    if unknown:
        raise PlanConfigError(f"unknown option(s) {', '.join(unknown)} (from cli); allowed: {', '.join(FIELDS)}")
    put({k: v for k, v in cli.items() if v is not None}, "cli")
    token = _env(env, "FLEETSERVE_HF_TOKEN") or _env(env, "HF_TOKEN") or token
    try:
        spec = PlanSpec.model_validate(values)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "config"
            lines.append(f"invalid {field} {values.get(field)!r} (from {sources.get(field, 'default')}): {err['msg']}")
        raise PlanConfigError("\n".join(lines)) from None
    return spec, sources, token  # model_fields_set = exactly the fields some source set


def _env(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return value if value is not None and value.strip() != "" else None


def _pd_defaults(value: str) -> str:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return "auto"
    if v in ("0", "false", "no", "off"):
        return "off"
    raise PlanConfigError(f"ENABLE_PD_DEFAULTS={value!r}: expected true (PD when seed 002's conditions hold) or false")


def _normalise(data: Any, source: str) -> tuple[dict[str, Any], str | None]:
    if not isinstance(data, dict):
        raise PlanConfigError(f"{source} must be a mapping of field names to values, got {type(data).__name__}")
    out: dict[str, Any] = {}
    token = None
    for key, value in data.items():
        key = str(key)
        if key in SECRET_KEYS:
            token = str(value) if value else None
            continue
        if key in _NESTED and isinstance(value, dict):
            for sub, sub_value in value.items():
                if sub not in _NESTED[key]:
                    raise PlanConfigError(f"unknown field {key}.{sub} (from {source}); allowed: "
                                          + ", ".join(f"{key}.{s}" for s in _NESTED[key]))
                target = _NESTED[key][sub]
                if target == "pd" and isinstance(sub_value, bool):
                    sub_value = "on" if sub_value else "off"
                if sub_value is not None:
                    out[target] = sub_value
            continue
        field = SEED_JSON_KEYS.get(key, key)
        if field not in FIELDS:
            raise PlanConfigError(f"unknown field {key!r} (from {source}); allowed: {', '.join(FIELDS)}")
        if value is not None:
            out[field] = value
    return out, token


def _read_json(raw: str) -> tuple[dict[str, Any], str | None]:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:  # position only, never the (secret-bearing) text
        raise PlanConfigError(f"DEPLOYMENT_CONFIG_JSON is not valid JSON: {exc.msg} at line {exc.lineno} column "
                              f"{exc.colno}") from None
    return _normalise(data, "DEPLOYMENT_CONFIG_JSON")


def _read_yaml(path: Path) -> tuple[dict[str, Any], str | None]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PlanConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise PlanConfigError(f"config file {path} is not valid YAML: {exc}") from None
    return _normalise(data if data is not None else {}, f"yaml {path}")
