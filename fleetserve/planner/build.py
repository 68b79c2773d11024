"""Spec -> hardware + model info -> plan: the impure edges around the pure `make_plan`."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from fleetserve.planner.hardware import Hardware, HardwareError, detect_hardware, synthetic_hardware
from fleetserve.planner.model_info import ModelInfoError, load_model_info
from fleetserve.planner.plan import check_hardware, make_plan
from fleetserve.planner.types import Plan, PlanError, PlanSpec


def hardware_for(spec: PlanSpec, detect: Callable[[], Hardware] = detect_hardware) -> Hardware:
    """`gpu_type` (+ `gpu_count`, default 1) describes the target machine; otherwise this one is detected."""
    if spec.gpu_type:
        try:
            return synthetic_hardware(spec.gpu_type, spec.gpu_count or 1)
        except HardwareError as exc:
            raise PlanError(str(exc)) from None
    hw = detect()
    if spec.gpu_count is not None:
        if hw.count < spec.gpu_count:
            raise PlanError(f"gpu_count {spec.gpu_count} asked for, but this machine has {hw.describe()}; "
                            "add --gpu-type TYPE to plan for another machine")
        hw = Hardware(gpus=hw.gpus[:spec.gpu_count], source=hw.source, interconnect=hw.interconnect,
                      ib_devices=hw.ib_devices, notes=hw.notes + (f"using {spec.gpu_count} of {hw.count} GPUs",))
    return hw


def build_plan(spec: PlanSpec, sources: Mapping[str, str] | None = None, hf_token: str | None = None, *,
               detect: Callable[[], Hardware] = detect_hardware, download: bool = True) -> Plan:
    hw = hardware_for(spec, detect)
    check_hardware(spec, hw, sources)  # before reading (perhaps downloading) the model's config
    try:
        info = load_model_info(spec.model, revision=spec.revision, hf_token=hf_token, download=download)
    except ModelInfoError as exc:
        raise PlanError(f"cannot read the model's config: {exc}") from None
    return make_plan(spec, hw, info, sources)
