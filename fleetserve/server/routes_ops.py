"""Operations routes: `/metrics` (Prometheus) and `/logs` (the tail of the worker's log file)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from fleetserve.logs import tail_lines
from fleetserve.server.auth import require_api_key, require_metrics_access
from fleetserve.server.state import WorkerState, get_state

router = APIRouter(tags=["operations"])

MAX_TAIL = 10_000


@router.get("/metrics", dependencies=[Depends(require_metrics_access)], response_class=Response,
            summary="Prometheus metrics (open unless --metrics-auth)")
async def metrics(state: Annotated[WorkerState, Depends(get_state)]) -> Response:
    return Response(content=state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/logs", dependencies=[Depends(require_api_key)],
            summary="The last lines of this worker's log file (JSON lines)")
async def logs(state: Annotated[WorkerState, Depends(get_state)],
               tail: Annotated[int, Query(ge=1, le=MAX_TAIL, description=f"How many lines, 1 to {MAX_TAIL}.")] = 100):
    if state.log_file_error:
        return JSONResponse({"detail": state.log_file_error}, status_code=503)
    if state.log_file is None:
        return JSONResponse({"detail": "this worker writes no log file (it was started without one)"},
                            status_code=404)
    try:
        lines = await asyncio.to_thread(tail_lines, state.log_file, tail)
    except FileNotFoundError:
        lines = []
    except OSError as exc:
        return JSONResponse({"detail": f"cannot read the log file {state.log_file}: {exc.strerror or exc}"},
                            status_code=503)
    return {"lines": lines, "log_file": str(state.log_file)}
