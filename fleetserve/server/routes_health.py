"""Liveness (`/healthz`), readiness (`/readyz`) and the descriptive `/health` (seed-compatible keys)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from fleetserve.engine.types import EngineState
from fleetserve.server.state import WorkerState, get_state

router = APIRouter(tags=["health"])


def _engine_status(state: WorkerState) -> str:
    if state.draining:
        return EngineState.DRAINING.value
    if state.load_error:
        return EngineState.FAILED.value
    if state.engine is None:
        return EngineState.LOADING.value
    return state.engine.health().state.value


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: Annotated[WorkerState, Depends(get_state)]):
    status = _engine_status(state)
    if status == EngineState.READY.value:
        return {"status": "ready"}
    body = {"status": status}
    if state.load_error:
        body["error"] = state.load_error
    return JSONResponse(body, status_code=503)


def worker_health(state: WorkerState) -> dict:
    """The /health fields every worker reports, whichever engine is behind it."""
    return {
        "uptime_s": round(time.time() - state.started_at, 3),
        "timestamp": time.time(),
        "hathora_region": state.config.hathora_region,
        "hathora_process_id": state.config.hathora_process_id,
        "draining": state.draining,
        "requests_in_flight": state.in_flight,
    }


@router.get("/health")
async def health(state: Annotated[WorkerState, Depends(get_state)]) -> dict:
    status = _engine_status(state)
    cfg = state.config
    engine = state.engine
    return {
        "status": "ok" if status == EngineState.READY.value else status,
        "engine_status": status,
        "model": state.served_model_name,
        "model_path": str(state.model_files.path),
        "backend": "native",
        "device": state.device,
        "max_model_len": engine.max_model_len if engine else cfg.max_model_len,
        **worker_health(state),
        "log_file": str(state.log_file) if state.log_file else None,
        "log_file_error": state.log_file_error,
        **({"error": state.load_error} if state.load_error else {}),
    }
