"""The plan behind `fleetserve serve --backend sglang|vllm`: a worker's ServeConfig -> PlanSpec -> Plan.

The worker's config already merged every source by precedence (`fleetserve.config`), so only the fields
some source set are handed to the planner (its own defaults and "explicit" reasons stay right), with
their sources for the plan's decisions. ServeConfig names that differ: `kv_cache_tokens` is the
planner's `max_total_tokens` (SGLang's MAX_TOTAL_TOKENS), `max_queue_len` its `max_queued_requests`.
The engines run with this interpreter (`python = sys.executable`), so they come from the same environment.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

from pydantic import ValidationError

from fleetserve.config import ServeConfig
from fleetserve.planner import hardware
from fleetserve.planner.build import hardware_for
from fleetserve.planner.model_info import ModelInfoError, load_model_info
from fleetserve.planner.plan import check_hardware, make_plan
from fleetserve.planner.types import Plan, PlanError, PlanSpec

RENAMED = {"kv_cache_tokens": "max_total_tokens", "max_queue_len": "max_queued_requests"}


def plan_spec(cfg: ServeConfig, sources: Mapping[str, str] | None = None) -> tuple[PlanSpec, dict[str, str]]:
    """(PlanSpec, source of each of its fields) from the fields of `cfg` that some source set."""
    sources = sources or {}
    values: dict = {"python": sys.executable}
    spec_sources: dict[str, str] = {}
    for field in sorted(cfg.model_fields_set):
        target = RENAMED.get(field, field)
        if target not in PlanSpec.model_fields or target == "python":
            continue
        values[target] = getattr(cfg, field)
        spec_sources[target] = sources.get(field, "config")
    try:
        spec = PlanSpec.model_validate(values)
    except ValidationError as exc:
        back = {v: k for k, v in RENAMED.items()}
        lines = []
        for err in exc.errors():
            target = str(err["loc"][0]) if err["loc"] else "config"
            field = back.get(target, target)
            lines.append(f"invalid {field} {values.get(target)!r} (from {spec_sources.get(target, 'default')}) for "
                         f"the {cfg.backend} backend: {err['msg']}")
        raise PlanError("\n".join(lines)) from None
    return spec, spec_sources


def plan_for_config(cfg: ServeConfig, sources: Mapping[str, str] | None = None, *,
                    detect: Callable[[], hardware.Hardware] | None = None, download: bool = True) -> Plan:
    """Detect this machine's GPUs, read the model's config.json, make the plan; PlanError says why not.

    The GPU check comes first (no download on a machine that cannot serve), then the model.
    """
    if cfg.backend == "native":
        raise PlanError("the native backend is served by `fleetserve serve` itself; plans here are for sglang and vllm")
    spec, spec_sources = plan_spec(cfg, sources)
    hw = hardware_for(spec, detect or hardware.detect_hardware)
    check_hardware(spec, hw, spec_sources)
    if spec.model in ("", "default"):
        raise PlanError(f"model 'default' is the embedded GGUF model of the native engine; the {cfg.backend} backend "
                        "serves a Hugging Face model: set --model (MODEL_PATH) to a Hub id such as "
                        "Qwen/Qwen2.5-7B-Instruct or a local HF model directory")
    token = cfg.hf_token.get_secret_value() if cfg.hf_token is not None else None
    try:
        info = load_model_info(spec.model, revision=spec.revision, hf_token=token, download=download)
    except ModelInfoError as exc:
        message = f"cannot read the model's config: {exc}"
        raise PlanError(message.replace(token, "***") if token else message) from None
    return make_plan(spec, hw, info, spec_sources)


def summary(plan: Plan) -> str:
    """One line: backend, mode, processes with their GPUs and TP, precision."""
    s = plan.settings
    procs = ", ".join(f"{p.name} (GPUs {','.join(map(str, p.gpus)) or '-'}, TP {p.tp_size or '-'}, port {p.port})"
                      for p in plan.processes)
    return (f"{plan.backend} {plan.mode} on {plan.hardware.get('description', '?')}: {procs}; precision "
            f"{s.precision}, quantization {s.quantization or '-'}, kv cache {s.kv_cache_dtype or 'auto'}, "
            f"max_model_len {s.max_model_len}")
