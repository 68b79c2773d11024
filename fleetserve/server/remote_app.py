"""The worker in front of a remote engine (SGLang or vLLM launched from a plan).

fleetserve keeps its own face: `/health` (seed keys + `backend`, `pd_mode`, `pd_bootstrap_port`,
the engine processes), `/healthz`, `/readyz` (200 once every engine process answers its readiness URL),
`/metrics` (fleetserve's request counters, the engines' own `sglang:*` / `vllm:*` series unchanged and
fleetserve's names translated from them), `/logs`, request ids, auth, body limits and drain. The
OpenAI routes under `/v1` are forwarded to the engine's entry (the router in PD mode) byte for byte,
so streams pass through untouched. If an engine process exits, `/health` says failed with its exit
code and the worker exits non-zero.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from fleetserve import __version__
from fleetserve.config import ServeConfig, fleetserve_home
from fleetserve.engine.remote import metrics_translate as mt
from fleetserve.engine.remote.launcher import EngineLauncher, LaunchError, missing_engine
from fleetserve.engine.remote.proxy import forward, new_client
from fleetserve.engine.types import EngineHealth, EngineState, EngineStats
from fleetserve.logs import tail_lines
from fleetserve.models import ModelFiles
from fleetserve.planner.types import Process
from fleetserve.server.auth import INFERENCE_DEPENDENCIES, require_api_key, require_metrics_access
from fleetserve.server.errors import install_error_handlers
from fleetserve.server.middleware import BodyLimitMiddleware, RequestContextMiddleware, add_cors
from fleetserve.server.routes_health import worker_health
from fleetserve.server.state import WorkerState

log = logging.getLogger("fleetserve.remote")
MONITOR_POLL_S = 0.5
SCRAPE_TIMEOUT_S = 5.0
# fleetserve families the translation provides; the worker's own (engine-less) values are dropped.
TRANSLATED = ("fleetserve_num_requests_running", "fleetserve_num_requests_waiting", "fleetserve_queue_depth",
              "fleetserve_kv_cache_usage", "fleetserve_prefix_cache_hit_rate", "fleetserve_tokens_per_second",
              "fleetserve_prompt_tokens", "fleetserve_generation_tokens", "fleetserve_time_to_first_token_seconds",
              "fleetserve_inter_token_latency_seconds", "fleetserve_e2e_request_latency_seconds",
              "fleetserve_engine_steps", "fleetserve_engine_preemptions", "fleetserve_engine_prompt_tokens_computed",
              "fleetserve_prefix_cache_queried_tokens", "fleetserve_prefix_cache_hit_tokens",
              "fleetserve_engine_requests_finished")


class RemoteEngine:
    """What `WorkerState.engine` needs from an engine, for engine processes run by a launcher.

    Requests never go through `generate` here: the HTTP routes are forwarded. `stats()` reports no
    running/waiting sequences because every proxied request is counted by the worker's in-flight
    counter (so drain waits for them); the engine's own queue is in the translated metrics.
    """

    def __init__(self, launcher: EngineLauncher, entry_url: str, backend: str, max_model_len: int | None,
                 pd_mode: bool = False, pd_bootstrap_port: int | None = None) -> None:
        self.launcher = launcher
        self.entry_url = entry_url
        self.backend = backend
        self.max_model_len = max_model_len
        self.pd_mode = pd_mode
        self.pd_bootstrap_port = pd_bootstrap_port
        self.error: str | None = None
        self.stopped = False

    def health(self) -> EngineHealth:
        if self.error:
            return EngineHealth(EngineState.FAILED, self.error)
        if self.stopped:
            return EngineHealth(EngineState.STOPPED)
        if self.launcher.ready:
            return EngineHealth(EngineState.READY)
        return EngineHealth(EngineState.LOADING)

    def stats(self) -> EngineStats:
        return EngineStats()

    def abort(self, request_id: str) -> None:  # forwarded requests are aborted by closing their connection
        return None

    async def generate(self, req):  # pragma: no cover - the routes forward HTTP instead
        raise NotImplementedError("a remote engine is reached through its HTTP API")
        yield  # noqa: B901

    async def shutdown(self, drain: bool = True) -> None:
        self.stopped = True
        await asyncio.to_thread(self.launcher.stop)


def _status(state: WorkerState, engine: RemoteEngine) -> str:
    if state.draining:
        return EngineState.DRAINING.value
    return engine.health().state.value


def create_remote_app(state: WorkerState, engine: RemoteEngine, *, on_failure=None,
                      ready_timeout_s: float = 1800.0, spec_num_steps: int | None = None) -> FastAPI:
    """The worker app for `engine`; its lifespan starts the engine processes and watches them."""
    client = new_client()

    async def watch() -> None:
        try:
            await engine.launcher.wait_ready(ready_timeout_s)
            log.info("engine ready at %s", engine.entry_url)
        except LaunchError as exc:
            if not engine.stopped:
                _fail(str(exc))
            return
        while not engine.stopped:
            dead = engine.launcher.failed()
            if dead and not engine.launcher.stopping:
                name, code = dead
                tail = engine.launcher.log_tail(name, 15)
                _fail(f"engine process {name} exited with code {code}" + (f"; last log lines:\n{tail}" if tail else ""))
                return
            await asyncio.sleep(MONITOR_POLL_S)

    def _fail(message: str) -> None:
        engine.error = message
        state.load_error = message
        log.error("%s", message)
        if on_failure:
            on_failure()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.launcher.start()
        task = asyncio.create_task(watch())
        try:
            yield
        finally:
            engine.stopped = True
            task.cancel()
            await client.aclose()
            await asyncio.to_thread(engine.launcher.stop)

    cfg = state.config
    app = FastAPI(title="fleetserve worker", version=__version__, lifespan=lifespan,
                  description=f"OpenAI-compatible endpoint backed by {engine.backend} (launched by fleetserve).")
    app.state.worker = state
    install_error_handlers(app)
    state.engine = engine  # wrapped in InstrumentedEngine by WorkerState; health/stats pass through

    ops = APIRouter(tags=["health"])

    @ops.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @ops.get("/readyz")
    async def readyz():
        status = _status(state, engine)
        if status == EngineState.READY.value:
            return {"status": "ready"}
        body = {"status": status, **({"error": engine.error} if engine.error else {})}
        return JSONResponse(body, status_code=503)

    @ops.get("/health")
    async def health() -> dict:
        status = _status(state, engine)
        return {
            "status": "ok" if status == EngineState.READY.value else status,
            "engine_status": status,
            "model": state.served_model_name,
            "model_path": cfg.model,
            "backend": engine.backend,
            "engine_url": engine.entry_url,
            "pd_mode": engine.pd_mode,
            "pd_bootstrap_port": engine.pd_bootstrap_port,
            "processes": engine.launcher.describe(),
            "max_model_len": engine.max_model_len,
            **worker_health(state),
            **({"error": engine.error} if engine.error else {}),
        }

    @ops.get("/metrics", dependencies=[Depends(require_metrics_access)], response_class=Response)
    async def metrics() -> Response:
        scrapes = await _scrape(client, engine)
        translated = mt.translate(scrapes, spec_num_steps)
        own = mt.drop_families(state.metrics.render().decode(), TRANSLATED if translated.found else ())
        text = own + mt.render_translated(translated) + mt.passthrough(scrapes)
        return Response(content=text, media_type=CONTENT_TYPE_LATEST)

    @ops.get("/logs", dependencies=[Depends(require_api_key)])
    async def logs(tail: Annotated[int, Query(ge=1, le=10_000)] = 100,
                   process: Annotated[str | None, Query(description="An engine process's log instead")] = None):
        if process is not None:
            names = [p["name"] for p in engine.launcher.describe()]
            if process not in names:
                return JSONResponse({"detail": f"no engine process {process!r}; processes: {', '.join(names)}"},
                                    status_code=404)
            return {"lines": engine.launcher.log_tail(process, tail).splitlines(), "process": process}
        if state.log_file is None:
            return JSONResponse({"detail": "this worker writes no log file"}, status_code=404)
        try:
            lines = await asyncio.to_thread(tail_lines, state.log_file, tail)
        except FileNotFoundError:
            lines = []
        return {"lines": lines, "log_file": str(state.log_file)}

    v1 = APIRouter(tags=["openai"])

    @v1.api_route("/v1/{path:path}", methods=["GET", "POST"])
    async def openai(request: Request, path: str) -> Response:
        if engine.error:
            return JSONResponse({"error": {"message": f"the engine failed: {engine.error.splitlines()[0]}",
                                           "type": "engine_failed", "param": None, "code": "engine_failed"}},
                                status_code=503)
        if not engine.launcher.ready:
            return JSONResponse({"error": {"message": "the engine is still loading; retry when /readyz answers 200",
                                           "type": "engine_loading", "param": None, "code": "engine_loading"}},
                                status_code=503, headers={"Retry-After": "5"})
        return await forward(client, engine.entry_url, request)

    app.include_router(ops)
    app.include_router(v1, dependencies=INFERENCE_DEPENDENCIES)
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_body_bytes)
    add_cors(app, cfg.cors_origins)
    app.add_middleware(RequestContextMiddleware, state=state)
    return app


async def _scrape(client, engine: RemoteEngine) -> list[mt.EngineScrape]:
    """Each engine process's /metrics (the router's are its own and not engine series)."""
    procs = [r.spec for r in engine.launcher.running if r.spec.role != "router"]

    async def one(p: Process) -> mt.EngineScrape:
        try:
            resp = await client.get(p.url + "/metrics", timeout=SCRAPE_TIMEOUT_S)
            text = resp.text if resp.status_code == 200 else ""
        except Exception:  # noqa: BLE001 -- a missing scrape is no data, not an error page
            text = ""
        return mt.EngineScrape(p.name, p.role, text)

    return list(await asyncio.gather(*(one(p) for p in procs)))


def new_remote_state(cfg: ServeConfig, served_model_name: str) -> WorkerState:
    files = ModelFiles(spec=cfg.model, name=served_model_name, format="remote", path=Path(cfg.model), source="remote")
    return WorkerState(config=cfg, model_files=files, served_model_name=served_model_name)


def run_remote_server(cfg: ServeConfig, processes: list[Process], *, backend: str, entry_url: str,
                      served_model_name: str, max_model_len: int | None = None, pd_mode: bool = False,
                      pd_bootstrap_port: int | None = None, extra_env: dict[str, str] | None = None,
                      python: str | None = None, spec_num_steps: int | None = None,
                      ready_timeout_s: float = 1800.0, log_dir: Path | None = None) -> None:
    """Serve `cfg.host:cfg.port` in front of the launched processes; exits 1 if an engine process dies."""
    import sys

    from fleetserve.server.app import configure_worker_logging
    from fleetserve.server.drain import serve_worker

    log_file, log_file_error = configure_worker_logging(cfg)
    state = new_remote_state(cfg, served_model_name)
    state.log_file = None if log_file_error else log_file
    state.log_file_error = log_file_error
    launcher = EngineLauncher(processes, log_dir or fleetserve_home() / "logs" / f"engines-{cfg.port}", extra_env,
                              python=python or sys.executable)
    engine = RemoteEngine(launcher, entry_url, backend, max_model_len, pd_mode, pd_bootstrap_port)
    serve_worker(lambda fail: create_remote_app(state, engine, on_failure=fail, ready_timeout_s=ready_timeout_s,
                                                spec_num_steps=spec_num_steps),
                 state, cfg.host, cfg.port, cfg.drain_timeout_s)


def run_planned_server(cfg: ServeConfig, sources: Mapping[str, str] | None = None) -> None:
    """`fleetserve serve --backend sglang|vllm`: detect the GPUs, plan, launch the engines and front them.

    No plan possible (no GPU, the H100 guard, a model that does not fit, ...): the planner's message is
    logged as an error (the platform shows a replica's last error line) and the process exits 2.
    """
    from rich.console import Console

    from fleetserve.planner.serve import plan_for_config
    from fleetserve.planner.types import PlanError
    from fleetserve.server.app import configure_worker_logging

    configure_worker_logging(cfg)
    try:
        plan = plan_for_config(cfg, sources)
    except PlanError as exc:
        log.error("plan failed for the %s backend: %s", cfg.backend, " ".join(str(exc).split()))
        raise SystemExit(2) from None
    if (missing := missing_engine(plan.processes)) is not None:
        log.error("cannot start the %s backend (engine not installed): %s", cfg.backend, missing)
        raise SystemExit(2)
    for decision in plan.decisions:
        log.info("plan: %s = %s (%s)", decision.setting, decision.value, decision.reason)
    for warning in plan.warnings:
        log.warning("plan: %s", warning)
    s = plan.settings
    name = s.served_model_name or s.model
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    base = f"http://{host}:{cfg.port}"
    Console(stderr=True).print(
        f"[bold green]fleetserve[/] serving [bold]{name}[/] with {plan.backend} ({plan.mode}, "
        f"{len(plan.processes)} process{'es' if len(plan.processes) > 1 else ''}) at [link]{base}/v1[/]  "
        f"(ready when {base}/readyz answers 200)", soft_wrap=True, highlight=False)
    token = cfg.hf_token.get_secret_value() if cfg.hf_token is not None else None
    serve_plan(plan, cfg, token)


def serve_plan(plan, cfg: ServeConfig, hf_token: str | None = None, **kwargs) -> None:
    """Run the worker for a planned sglang/vllm deployment: launch `plan.processes`, front them on cfg's port.

    The plan should be made with `python=sys.executable` when the engines live in this interpreter's
    environment; the HF token is passed to the engines' environment only (never stored in the plan).
    """
    if plan.backend == "native":
        raise ValueError("a native plan is served by `fleetserve serve` itself (run_server), not by a remote engine")
    s = plan.settings
    run_remote_server(cfg, plan.processes, backend=plan.backend, entry_url=plan.entry_url,
                      served_model_name=s.served_model_name or s.model, max_model_len=s.max_model_len,
                      pd_mode=plan.pd_mode, pd_bootstrap_port=plan.pd_bootstrap_port,
                      extra_env={"HF_TOKEN": hf_token} if hf_token else None,
                      spec_num_steps=s.speculative_num_steps, **kwargs)
