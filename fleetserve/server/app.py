"""The worker HTTP app (FastAPI) and `run_server`, the body of `fleetserve serve`.

The HTTP server starts at once (so /healthz answers and /readyz says "loading"); the model loads
in a background thread and /readyz turns 200 after the engine has run one warm-up step. On SIGTERM
or SIGINT the worker drains (see `drain.py`) and exits 0.

Middleware, outermost first: request id / timing / access log / request metrics, CORS (only when
origins are configured), body size limit. Inference routers include `INFERENCE_DEPENDENCIES`
(API key + refusing new work while draining).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI
from rich.console import Console

from fleetserve import __version__
from fleetserve.config import ServeConfig, resolve_log_file
from fleetserve.device import resolve_device, resolve_dtype
from fleetserve.engine.native.engine import EngineConfig, NativeEngine
from fleetserve.logs import register_secret, setup_logging
from fleetserve.models import ModelFiles, ModelResolutionError, resolve_model
from fleetserve.server import routes_batch, routes_health, routes_openai, routes_ops
from fleetserve.server.auth import INFERENCE_DEPENDENCIES
from fleetserve.server.errors import install_error_handlers
from fleetserve.server.middleware import BodyLimitMiddleware, RequestContextMiddleware, add_cors
from fleetserve.server.state import WorkerState
from fleetserve.tokenizer import Tokenizer

log = logging.getLogger("fleetserve.server")


def engine_config(cfg: ServeConfig) -> EngineConfig:
    return EngineConfig(max_model_len=cfg.max_model_len, max_batch_tokens=cfg.max_batch_tokens,
                        max_running_seqs=cfg.max_running_seqs, kv_cache_tokens=cfg.kv_cache_tokens,
                        block_size=cfg.block_size, max_queue_len=cfg.max_queue_len,
                        enable_prefix_caching=cfg.enable_prefix_caching, kv_cache_memory=cfg.kv_cache_memory,
                        quantization=cfg.quantization, kv_cache_dtype=cfg.kv_cache_dtype,
                        tensor_parallel_size=cfg.tp_size or 1, attention_backend=cfg.attention_backend,
                        **speculative_config(cfg))


def check_tensor_parallel(tp_size: int, files: ModelFiles) -> None:
    """Before anything starts: the model's heads must split over tp_size ranks (exit 2 with the reason)."""
    from fleetserve.engine.native.parallel import TensorParallelError, check_tp
    from fleetserve.engine.native.weights import load_model_config_and_weights

    try:
        check_tp(load_model_config_and_weights(files.format, files.path)[0], tp_size)
    except TensorParallelError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None
    log.info("tensor parallel size %d: rank 0 serves, %d worker process(es) hold the other shards", tp_size,
             tp_size - 1)


def speculative_config(cfg: ServeConfig) -> dict:
    """--speculative ngram|eagle for the native engine: k = speculative_num_steps, else speculative_num_draft_tokens,
    else 4 drafts per step; the EAGLE head from speculative_draft_model_path (a local directory or a Hub id)."""
    if cfg.speculative in (None, "none"):
        return {}
    k = cfg.speculative_num_steps or cfg.speculative_num_draft_tokens or 4
    out: dict = {"speculative_method": cfg.speculative, "num_speculative_tokens": k}
    path = cfg.speculative_draft_model_path
    if cfg.speculative == "eagle" and path:
        if not Path(path).expanduser().is_dir():
            from huggingface_hub import snapshot_download

            token = cfg.hf_token.get_secret_value() if cfg.hf_token else None
            path = snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.bin"], token=token)
        out["speculative_draft_path"] = str(Path(path).expanduser())
    return out


def load_engine(state: WorkerState, progress: bool = False) -> None:
    """Tokenizer + native engine for the resolved model; fills `state` (or `state.load_error`)."""
    cfg, files = state.config, state.model_files
    try:
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.precision, device)
        state.device = str(device)
        tokenizer = Tokenizer.from_model_files(files)
        engine = NativeEngine.load(files.format, files.path, tokenizer.eos_token_ids, engine_config(cfg),
                                   device, dtype, progress=progress)
        engine.start()
    except Exception as exc:  # noqa: BLE001 (any load failure is reported by /readyz, not raised)
        state.load_error = f"{type(exc).__name__}: {exc}"
        log.error("model failed to load: %s", state.load_error)
        return
    state.tokenizer, state.engine = tokenizer, engine
    log.info("model %s ready on %s (%s)%s", state.served_model_name, device, str(dtype).removeprefix("torch."),
             f", tensor parallel size {engine.tp_size}" if engine.tp_size > 1 else "")


def new_state(cfg: ServeConfig, files: ModelFiles) -> WorkerState:
    return WorkerState(config=cfg, model_files=files, served_model_name=cfg.served_model_name or files.name)


def create_app(state: WorkerState, load: bool = True, on_load_failure=None) -> FastAPI:
    """`load=False` when the caller has already filled state.engine (tests share one engine)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load and state.engine is None:
            def _load() -> None:
                load_engine(state)
                if state.load_error and on_load_failure:
                    on_load_failure()

            threading.Thread(target=_load, name="fleetserve-load", daemon=True).start()
        yield
        if load and state.engine is not None:
            await state.engine.shutdown(drain=False)

    cfg = state.config
    for key in cfg.api_keys:
        register_secret(key.get_secret_value())
    if cfg.metrics_auth and not cfg.api_keys:
        log.warning("metrics_auth is set but no API key is configured, so /metrics stays open; "
                    "add keys with --api-key or FLEETSERVE_API_KEY")
    app = FastAPI(title="fleetserve worker", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible inference server backed by fleetserve's native engine.")
    app.state.worker = state
    install_error_handlers(app)
    app.include_router(routes_health.router)
    app.include_router(routes_ops.router)
    app.include_router(routes_openai.router, dependencies=INFERENCE_DEPENDENCIES)
    app.include_router(routes_batch.router, dependencies=INFERENCE_DEPENDENCIES)
    # add_middleware puts each new one outside the previous ones: innermost first.
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_body_bytes)
    add_cors(app, cfg.cors_origins)
    app.add_middleware(RequestContextMiddleware, state=state)
    return app


def configure_worker_logging(cfg: ServeConfig, json_logs: bool | None = None) -> tuple[Path, str | None]:
    """Logging to stderr and to the worker's log file; returns (the file, why it cannot be written or None)."""
    path = resolve_log_file(cfg)
    return path, setup_logging(cfg.log_level, json_logs=json_logs, log_file=path)


def run_server(cfg: ServeConfig, sources: Mapping[str, str] | None = None) -> None:
    """Serve `cfg` until SIGTERM/SIGINT. With backend sglang or vllm: plan the engines and front them."""
    if cfg.backend != "native":
        from fleetserve.server.remote_app import run_planned_server

        run_planned_server(cfg, sources)
        return

    from fleetserve.server.drain import serve_worker

    torch.set_num_threads(max(1, torch.get_num_threads()))
    console = Console(stderr=True)
    log_file, log_file_error = configure_worker_logging(cfg)
    try:
        files = resolve_model(cfg.model, revision=cfg.revision,
                              hf_token=cfg.hf_token.get_secret_value() if cfg.hf_token else None, progress=True)
    except ModelResolutionError as exc:  # one clear line (the platform shows it), not a traceback
        log.error("model could not be loaded: %s", " ".join(str(exc).split()))
        raise SystemExit(2) from None
    if (cfg.tp_size or 1) > 1:
        check_tensor_parallel(cfg.tp_size, files)
    state = new_state(cfg, files)
    state.log_file = None if log_file_error else log_file
    state.log_file_error = log_file_error

    def announce() -> None:
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
        base = f"http://{host}:{cfg.port}"
        console.print(f"[bold green]fleetserve[/] serving [bold]{state.served_model_name}[/] at [link]{base}/v1[/]"
                      f"  (ready when {base}/readyz answers 200)")
        console.print(
            f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{state.served_model_name}\", "
            f"\"messages\": [{{\"role\": \"user\", \"content\": \"What is the capital of France?\"}}], "
            f"\"temperature\": 0}}'",
            soft_wrap=True, highlight=False, markup=False)

    serve_worker(lambda fail: create_app(state, on_load_failure=fail), state, cfg.host, cfg.port,
                 cfg.drain_timeout_s, before_serve=announce)
