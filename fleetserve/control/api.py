"""`/api/v1/deployments`: the control API (the console and the CLI use it too)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from fleetserve.control.providers.local import tail_lines
from fleetserve.control.spec import DeploymentPatch, DeploymentSpec, DeploymentView, ReplicaView
from fleetserve.control.store import DeploymentRow

router = APIRouter(prefix="/api/v1", tags=["deployments"])


def platform(request: Request):
    return request.app.state.platform


def view(p, d: DeploymentRow) -> DeploymentView:
    reps = p.store.replicas(d.name)
    return DeploymentView(
        name=d.name, status=d.status, message=d.message,
        ready_replicas=sum(r.status == "ready" for r in reps),
        desired_replicas=p.reconciler.desired(d),
        replicas=[ReplicaView(id=r.id, url=r.url, pid=r.pid, status=r.status, started_at=r.started_at,
                              generation=r.generation) for r in reps],
        endpoint=f"{p.base_url}/v1", spec=d.spec.public(), created_at=d.created_at, updated_at=d.updated_at,
    )


def _get(p, name: str) -> DeploymentRow:
    d = p.store.get(name)
    if d is None:
        raise HTTPException(404, f"no deployment named '{name}'")
    return d


@router.post("/deployments", status_code=201, response_model=DeploymentView)
async def create(spec: DeploymentSpec, p=Depends(platform)) -> DeploymentView:
    if not p.store.create(spec):
        raise HTTPException(409, f"a deployment named '{spec.name}' already exists")
    p.store.event(spec.name, "Created", f"deployment created: model {spec.model}, "
                                        f"replicas {spec.replicas.min}..{spec.replicas.max}")
    p.reconciler.poke()
    return view(p, p.store.get(spec.name))


@router.get("/deployments", response_model=list[DeploymentView])
async def list_deployments(p=Depends(platform)) -> list[DeploymentView]:
    return [view(p, d) for d in p.store.list()]


@router.get("/deployments/{name}", response_model=DeploymentView)
async def get(name: str, p=Depends(platform)) -> DeploymentView:
    return view(p, _get(p, name))


@router.patch("/deployments/{name}", response_model=DeploymentView)
async def patch(name: str, body: DeploymentPatch, p=Depends(platform)) -> DeploymentView:
    d = _get(p, name)
    if d.deleting:
        raise HTTPException(409, f"deployment '{name}' is being deleted")
    spec = d.spec.model_copy(deep=True)
    changes = []
    if body.replicas is not None:
        lo = spec.replicas.min if body.replicas.min is None else body.replicas.min
        hi = spec.replicas.max if body.replicas.max is None else body.replicas.max
        if hi < max(lo, 1):
            raise HTTPException(422, [{"loc": ["body", "replicas", "max"], "type": "value_error",
                                       "msg": f"replicas.max ({hi}) must be >= replicas.min ({lo}) and >= 1"}])
        if spec.backend != "native" and hi > 1:
            raise HTTPException(422, [{"loc": ["body", "replicas", "max"], "type": "value_error",
                                       "msg": f"backend {spec.backend} runs one replica per machine: replicas.max "
                                              f"must be 1, not {hi}"}])
        spec.replicas.min, spec.replicas.max = lo, hi
        changes.append(f"replicas {lo}..{hi}")
    if body.autoscale is not None:
        spec.autoscale = body.autoscale
        changes.append("autoscale policy")
    rolling = False
    if body.engine_args is not None:
        try:
            spec = DeploymentSpec.model_validate({**spec.model_dump(), "hf_token": d.spec.hf_token,
                                                  "engine_args": body.engine_args})
        except ValueError as exc:
            raise HTTPException(422, [{"loc": ["body", "engine_args"], "type": "value_error",
                                       "msg": str(exc).splitlines()[-1]}]) from exc
        rolling = body.engine_args != d.spec.engine_args
        changes.append(f"engine_args {body.engine_args}")
    p.store.update_spec(spec, bump_generation=rolling)
    if changes:
        p.store.event(name, "Updated", ("rolling update: " if rolling else "") + ", ".join(changes))
    p.reconciler.poke()
    return view(p, p.store.get(name))


@router.delete("/deployments/{name}", status_code=202, response_model=DeploymentView)
async def delete(name: str, p=Depends(platform)) -> DeploymentView:
    _get(p, name)
    p.store.mark_deleting(name)
    p.store.event(name, "Deleting", "deployment deleted: draining and stopping its replicas")
    p.reconciler.poke()
    return view(p, p.store.get(name))


@router.get("/deployments/{name}/events")
async def events(name: str, limit: Annotated[int, Query(ge=1, le=1000)] = 100, p=Depends(platform)) -> dict:
    _get(p, name)
    return {"events": p.store.events(name, limit)}


@router.get("/deployments/{name}/metrics")
async def metrics(name: str, p=Depends(platform)) -> dict:
    _get(p, name)
    series = list(p.metrics.series.get(name, []))
    return {"current": series[-1] if series else None, "series": series}


@router.get("/deployments/{name}/logs")
async def logs(name: str, tail: Annotated[int, Query(ge=1, le=10000)] = 100, replica: str | None = None,
               follow: bool = False, p=Depends(platform)):
    _get(p, name)
    reps = [r for r in p.store.replicas(name) if replica is None or r.id == replica]
    if replica is not None and not reps:
        raise HTTPException(404, f"deployment '{name}' has no replica '{replica}'")
    if not follow:
        return {"lines": [{"replica": r.id, "line": line} for r in reps for line in await p.provider.logs(r, tail)]}
    paths = {r.id: path for r in reps if (path := p.provider.log_file(r)) is not None}
    return StreamingResponse(_follow(paths, tail), media_type="text/plain")


async def _follow(paths: dict[str, Path], tail: int):
    """Tail -f over the replicas' log files, prefixed by replica id (ends when the client goes away)."""
    offsets = {}
    for rid, path in paths.items():
        for line in tail_lines(path, tail):
            yield f"[{rid}] {line}\n"
        offsets[rid] = path.stat().st_size if path.exists() else 0
    while True:
        await asyncio.sleep(0.5)
        for rid, path in paths.items():
            if not path.exists():
                continue
            size = path.stat().st_size
            if size > offsets[rid]:
                with open(path, "rb") as f:
                    f.seek(offsets[rid])
                    chunk = f.read(size - offsets[rid])
                offsets[rid] = size
                for line in chunk.decode(errors="replace").splitlines():
                    yield f"[{rid}] {line}\n"
