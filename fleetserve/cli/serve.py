"""`fleetserve serve`: run one worker, or check (`--dry-run`) / show (`--print-config`) its config.

Only options the user actually typed reach `load_serve_config` (every default here is None), so the
env, DEPLOYMENT_CONFIG_JSON and YAML layers are not masked by CLI defaults. Heavy modules (torch, the
server) are imported only on the path that needs them.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from fleetserve.config import ConfigError, ServeConfig, load_serve_config, render_config

EXIT_CONFIG = 2  # usage/config problems, like click's own usage errors

SERVE_HELP = """\
Serve one model behind an OpenAI-compatible HTTP API, using fleetserve's native engine or, with --backend sglang or vllm, that engine launched on this machine's GPUs from a plan (see `fleetserve plan`).

The worker answers /v1/chat/completions, /v1/completions and /v1/models (streaming or not), plus /health, /healthz (liveness), /readyz (readiness), /metrics (Prometheus) and /logs (the tail of its log file). The model is loaded once at start-up and requests are batched continuously.

With --api-key (or FLEETSERVE_API_KEY) every route except /health, /healthz, /readyz and (unless --metrics-auth) /metrics requires 'Authorization: Bearer <key>'; with no key configured nothing requires one. Every request gets an X-Request-ID (the caller's, or a new one) that appears in its log lines. On SIGTERM or SIGINT the worker drains: /readyz turns 503, new requests get 503, requests in flight finish (up to --drain-timeout seconds), then it exits 0; a second signal exits at once.

With --backend sglang or vllm the worker detects the GPUs, plans precision, tensor parallelism, PD disaggregation and speculative decoding, starts the engine processes, forwards /v1 to them (streams untouched) and keeps its own /health, /readyz, /metrics (the engine's series plus fleetserve's) and /logs. Without NVIDIA GPUs, or when no plan fits, it exits 2 with the reason. Settings one backend cannot honour are rejected, not ignored (e.g. --quantization with the native engine, --max-batch-tokens with sglang).

Every option can also come from the environment or a file. Precedence, highest first: command-line flags, FLEETSERVE_<FIELD> variables (e.g. FLEETSERVE_PORT, FLEETSERVE_BACKEND), the seed names MODEL_PATH, PORT, HOST, LOG_LEVEL, MAX_TOTAL_TOKENS, HF_TOKEN, TP_SIZE, H100_ONLY, ENABLE_PD_DEFAULTS, DISAGG_BOOTSTRAP_PORT, DISAGG_IB_DEVICE, DISAGG_TRANSFER_BACKEND and SPECULATIVE_*, HATHORA_DEFAULT_PORT (port only), DEPLOYMENT_CONFIG_JSON, the YAML file given with --config, then built-in defaults. Use --print-config to see the value and source of every setting (and the plan, with sglang or vllm), and --dry-run to check the config, model, port and device (or the plan, ports and engine install) without serving.
"""

SERVE_EPILOG = """\
[bold]Examples[/bold]

  fleetserve serve                                  [dim]# embedded SmolLM2-135M on 127.0.0.1:8000[/dim]

  fleetserve serve --model ./my-model --port 9000   [dim]# a local HF directory or .gguf file[/dim]

  fleetserve serve --model Qwen/Qwen2.5-0.5B-Instruct --device cuda --precision bf16

  PORT=8080 fleetserve serve --config serve.yaml --print-config

  fleetserve serve --dry-run && fleetserve serve    [dim]# check first, then run[/dim]

  FLEETSERVE_API_KEY=k1-secret,k2-secret fleetserve serve --host 0.0.0.0 --cors-origin https://app.example.com

  fleetserve serve --backend sglang --model Qwen/Qwen2.5-7B-Instruct   [dim]# SGLang on this machine's GPUs[/dim]

  MODEL_PATH=meta-llama/Llama-3.1-8B-Instruct TP_SIZE=2 fleetserve serve --backend vllm --dry-run
"""

_MODEL = "Model"
_ENGINE = "Engine"
_SERVER = "Server"
_SECURITY = "Security"
_OBSERVABILITY = "Observability"
_CONFIG = "Configuration"
_GPU = "GPU backends (sglang, vllm)"


def _err(console: Console, message: str) -> None:
    console.print(f"[bold red]error:[/bold red] {escape(message)}", markup=True, highlight=False, soft_wrap=True)


def serve(
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="'default' (embedded SmolLM2-135M-Instruct), a local path (HF directory or .gguf) "
        "or a Hugging Face Hub id org/name. \\[default: default]", rich_help_panel=_MODEL)] = None,
    revision: Annotated[str | None, typer.Option(
        help="Hub branch, tag or commit to use.", rich_help_panel=_MODEL)] = None,
    served_model_name: Annotated[str | None, typer.Option(
        help="Name clients pass as `model`. \\[default: the model's name]", rich_help_panel=_MODEL)] = None,
    hf_token: Annotated[str | None, typer.Option(
        help="Hugging Face token for gated/private models (never printed or logged). Prefer HF_TOKEN.",
        rich_help_panel=_MODEL)] = None,
    backend: Annotated[str | None, typer.Option(
        "--backend", help="native (fleetserve's own engine) | sglang | vllm (launched on this machine's NVIDIA "
        "GPUs from a plan). \\[default: native]", rich_help_panel=_ENGINE)] = None,
    precision: Annotated[str | None, typer.Option(
        "--precision", "--dtype", help="auto | fp32 | bf16 | fp16, and fp8 with sglang/vllm. auto = fp32 on CPU, "
        "bf16 on CUDA (native; bf16 on a CPU = bf16 matmuls over fp32 activations, ~1.4x faster batched, close "
        "to but not token-exact with fp32); FP8 weights + FP8 KV cache on H100/H200, else bf16 (sglang, vllm). "
        "--dtype is an alias. \\[default: auto]", rich_help_panel=_ENGINE)] = None,
    device: Annotated[str | None, typer.Option(
        help="auto | cpu | cuda | mps. auto picks cuda, then mps, then cpu. \\[default: auto]",
        rich_help_panel=_ENGINE)] = None,
    max_model_len: Annotated[int | None, typer.Option(
        help="Longest prompt + completion in tokens. \\[default: the model's context length]",
        rich_help_panel=_ENGINE)] = None,
    max_batch_tokens: Annotated[int | None, typer.Option(
        help="Token budget of one engine step (prefill chunks + decodes). \\[default: 2048]",
        rich_help_panel=_ENGINE)] = None,
    max_running_seqs: Annotated[int | None, typer.Option(
        help="Most sequences decoded together. \\[default: 64]", rich_help_panel=_ENGINE)] = None,
    kv_cache_tokens: Annotated[int | None, typer.Option(
        help="KV cache pool size in tokens (SGLang's MAX_TOTAL_TOKENS). \\[default: sized automatically]",
        rich_help_panel=_ENGINE)] = None,
    block_size: Annotated[int | None, typer.Option(
        help="Tokens per KV cache block: 8, 16, 32, 64 or 128. \\[default: 16]", rich_help_panel=_ENGINE)] = None,
    kv_cache_memory: Annotated[str | None, typer.Option(
        help="KV cache pool size in memory, e.g. 2GiB or 512MiB (--kv-cache-tokens wins if both are given). "
        "\\[default: 2 GiB or a fifth of free RAM on CPU, 85% of free GPU memory on CUDA]",
        rich_help_panel=_ENGINE)] = None,
    attention_backend: Annotated[str | None, typer.Option(
        help="Attention over the paged KV cache: auto (Triton kernels on CUDA when triton is installed; on a CPU "
        "the C decode kernel when a C compiler is there; PyTorch SDPA otherwise), torch, cpu (CPU only), or "
        "triton (CUDA only). \\[default: auto]", rich_help_panel=_ENGINE)] = None,
    prefix_caching: Annotated[bool | None, typer.Option(
        "--prefix-caching/--no-prefix-caching", help="Share the KV cache of common prompt prefixes between "
        "requests (a shared system prompt is computed once). \\[default: on]", rich_help_panel=_ENGINE,
        show_default=False)] = None,
    max_queue_len: Annotated[int | None, typer.Option(
        help="Waiting requests beyond this get HTTP 429. \\[default: 256]", rich_help_panel=_SERVER)] = None,
    host: Annotated[str | None, typer.Option(
        help="Address to bind. \\[default: 127.0.0.1; 0.0.0.0 on Hathora]", rich_help_panel=_SERVER)] = None,
    port: Annotated[int | None, typer.Option(
        "--port", "-p", help="TCP port to listen on. \\[default: 8000]", rich_help_panel=_SERVER)] = None,
    max_body_bytes: Annotated[int | None, typer.Option(
        help="Largest request body accepted, in bytes; larger ones get HTTP 413 (checked from Content-Length "
        "and while reading chunked bodies). \\[default: 4194304 (4 MiB)]", rich_help_panel=_SERVER)] = None,
    max_batch_size: Annotated[int | None, typer.Option(
        help="Most prompts in one /generate or /loglikelihood request. \\[default: 64]",
        rich_help_panel=_SERVER)] = None,
    max_new_tokens: Annotated[int | None, typer.Option(
        help="Largest max_tokens a /generate request may ask for. \\[default: 1024]", rich_help_panel=_SERVER)] = None,
    max_request_tokens: Annotated[int | None, typer.Option(
        help="Prompt + new tokens summed over one batch request. \\[default: 131072]",
        rich_help_panel=_SERVER)] = None,
    drain_timeout: Annotated[float | None, typer.Option(
        "--drain-timeout", help="On SIGTERM/SIGINT, seconds to let requests in flight finish before exiting. "
        "\\[default: 30]", rich_help_panel=_SERVER)] = None,
    api_key: Annotated[list[str] | None, typer.Option(
        "--api-key", help="An API key clients must send as 'Authorization: Bearer <key>' (at least 8 characters); "
        "repeat for several. Visible to other users in the process list: prefer FLEETSERVE_API_KEY (one key or "
        "several separated by commas). Never printed or logged. \\[default: none, no key required]",
        rich_help_panel=_SECURITY, show_default=False)] = None,
    cors_origin: Annotated[list[str] | None, typer.Option(
        "--cors-origin", help="A browser origin allowed to call the API cross-origin, e.g. "
        "https://app.example.com, or * for any; repeat for several. \\[default: none, cross-origin calls "
        "blocked]", rich_help_panel=_SECURITY, show_default=False)] = None,
    metrics_auth: Annotated[bool | None, typer.Option(
        "--metrics-auth/--no-metrics-auth", help="Require an API key for /metrics too (when keys are "
        "configured). \\[default: /metrics is open]", rich_help_panel=_SECURITY, show_default=False)] = None,
    log_level: Annotated[str | None, typer.Option(
        help="debug | info | warning | error (any case). \\[default: info]", rich_help_panel=_OBSERVABILITY)] = None,
    log_file: Annotated[Path | None, typer.Option(
        help="File the worker also writes its JSON log lines to (served by GET /logs). If it cannot be "
        "written the worker still serves, and /health reports log_file_error. "
        "\\[default: $FLEETSERVE_HOME/logs/worker-<port>.log]", rich_help_panel=_OBSERVABILITY,
        dir_okay=False)] = None,
    tp_size: Annotated[int | None, typer.Option(
        "--tp-size", help="GPUs per engine (tensor parallelism; env TP_SIZE). Setting it turns off the automatic "
        "PD split. The native engine runs one process per rank (one per GPU; on CPU, gloo processes); the model's "
        "heads must divide by it. \\[default: the largest the model and GPUs allow; native: 1]",
        rich_help_panel=_GPU)] = None,
    quantization: Annotated[str | None, typer.Option(
        help="Engine quantization method: fp8 with the native engine (FP8 weights, per-channel scales); fp8, awq, "
        "gptq, ... with sglang/vllm. \\[default: none native; fp8 on H100/H200 with precision auto for sglang/vllm]",
        rich_help_panel=_GPU)] = None,
    kv_cache_dtype: Annotated[str | None, typer.Option(
        help="KV cache dtype (auto, fp8_e4m3, fp8_e5m2, ...): fp8 halves KV memory vs bf16. \\[default: the model's; "
        "fp8_e5m2 with FP8 on sglang/vllm]",
        rich_help_panel=_GPU)] = None,
    mem_fraction_static: Annotated[float | None, typer.Option(
        help="Fraction of each GPU's memory for weights + KV cache. \\[default: 0.85 sglang, 0.90 vllm]",
        rich_help_panel=_GPU)] = None,
    h100_only: Annotated[bool | None, typer.Option(
        "--h100-only/--no-h100-only", help="Refuse to start on anything but H100 GPUs (env H100_ONLY).",
        rich_help_panel=_GPU, show_default=False)] = None,
    pd: Annotated[str | None, typer.Option(
        "--pd", help="Prefill/decode disaggregation (sglang): auto (on 2, 4 or 8 H100s without --tp-size) | on | "
        "off (env ENABLE_PD_DEFAULTS=false). \\[default: auto]", rich_help_panel=_GPU)] = None,
    pd_bootstrap_port: Annotated[int | None, typer.Option(
        help="KV bootstrap port of the first prefill server (env DISAGG_BOOTSTRAP_PORT). \\[default: 8998]",
        rich_help_panel=_GPU)] = None,
    pd_ib_device: Annotated[str | None, typer.Option(
        help="RDMA devices for the KV transfer, e.g. mlx5_0,mlx5_1 (env DISAGG_IB_DEVICE). \\[default: SGLang's "
        "choice]", rich_help_panel=_GPU)] = None,
    speculative: Annotated[str | None, typer.Option(
        help="Speculative decoding: none | eagle | eagle3 | ngram (env SPECULATIVE_ALGORITHM). The native engine "
        "runs ngram and eagle (EAGLE-1 head) for greedy requests, k = --speculative-num-steps, else "
        "--speculative-num-draft-tokens, else 4 drafts per step. \\[default: none]",
        rich_help_panel=_GPU)] = None,
    speculative_draft_model_path: Annotated[str | None, typer.Option(
        help="EAGLE draft model, Hub id or path (env SPECULATIVE_DRAFT_MODEL_PATH).", rich_help_panel=_GPU)] = None,
    speculative_num_steps: Annotated[int | None, typer.Option(
        help="Draft steps per decode step (env SPECULATIVE_NUM_STEPS). \\[default: 2 with EAGLE]",
        rich_help_panel=_GPU)] = None,
    speculative_eagle_topk: Annotated[int | None, typer.Option(
        help="Draft branches per step (env SPECULATIVE_EAGLE_TOPK). \\[default: 6 with EAGLE]",
        rich_help_panel=_GPU)] = None,
    speculative_num_draft_tokens: Annotated[int | None, typer.Option(
        help="Draft tokens verified per step (env SPECULATIVE_NUM_DRAFT_TOKENS). \\[default: 10 with EAGLE]",
        rich_help_panel=_GPU)] = None,
    engine_port: Annotated[int | None, typer.Option(
        help="First port of the engine processes, bound on 127.0.0.1 (the router or engine, then prefill, then "
        "decode servers). \\[default: 30000]", rich_help_panel=_GPU)] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="YAML file of settings (same field names as the options, e.g. max_batch_tokens).",
        rich_help_panel=_CONFIG, dir_okay=False)] = None,
    print_config: Annotated[bool, typer.Option(
        "--print-config", help="Print every setting with its source (secrets hidden) and exit.",
        rich_help_panel=_CONFIG)] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Check config, model files (no download), port and device; exit 0 if all is well, "
        "2 with the first problem otherwise.", rich_help_panel=_CONFIG)] = False,
) -> None:
    cli: dict[str, Any] = {
        "model": model, "revision": revision, "served_model_name": served_model_name, "hf_token": hf_token,
        "precision": precision, "device": device, "max_model_len": max_model_len,
        "max_batch_tokens": max_batch_tokens, "max_running_seqs": max_running_seqs,
        "kv_cache_tokens": kv_cache_tokens, "block_size": block_size, "max_queue_len": max_queue_len,
        "enable_prefix_caching": prefix_caching, "kv_cache_memory": kv_cache_memory,
        "attention_backend": attention_backend,
        "host": host, "port": port, "log_level": log_level, "max_body_bytes": max_body_bytes,
        "drain_timeout_s": drain_timeout, "api_keys": api_key or None, "cors_origins": cors_origin or None,
        "metrics_auth": metrics_auth, "log_file": log_file, "max_batch_size": max_batch_size,
        "max_new_tokens": max_new_tokens, "max_request_tokens": max_request_tokens, "backend": backend,
        "tp_size": tp_size, "quantization": quantization, "kv_cache_dtype": kv_cache_dtype,
        "mem_fraction_static": mem_fraction_static, "h100_only": h100_only, "pd": pd,
        "pd_bootstrap_port": pd_bootstrap_port, "pd_ib_device": pd_ib_device, "speculative": speculative,
        "speculative_draft_model_path": speculative_draft_model_path, "speculative_num_steps": speculative_num_steps,
        "speculative_eagle_topk": speculative_eagle_topk, "speculative_num_draft_tokens": speculative_num_draft_tokens,
        "engine_port": engine_port,
    }
    cli = {k: v for k, v in cli.items() if v is not None}
    out, err = Console(), Console(stderr=True)
    try:
        cfg, sources = load_serve_config(cli, config)
    except ConfigError as exc:
        _err(err, str(exc))
        raise typer.Exit(EXIT_CONFIG) from None

    remote = cfg.backend != "native"
    if print_config:
        out.print(render_config(cfg, sources))
        if remote:  # the plan it would run: GPUs, processes and their command lines, decisions
            _print_plan(cfg, sources, out, err)
        if not dry_run:
            raise typer.Exit(0)
    if dry_run:
        problem, summary = (remote_dry_run_checks(cfg, sources, None if print_config else out) if remote
                            else dry_run_checks(cfg))
        if problem:
            _err(err, problem)
            raise typer.Exit(EXIT_CONFIG)
        out.print(f"[bold green]ok[/bold green] {escape(summary)}", highlight=False, soft_wrap=True)
        raise typer.Exit(0)

    from fleetserve.logs import register_secret, setup_logging

    setup_logging(cfg.log_level)
    if cfg.hf_token is not None:
        register_secret(cfg.hf_token.get_secret_value())
    for key in cfg.api_keys:
        register_secret(key.get_secret_value())
    from fleetserve.server.app import run_server

    run_server(cfg, sources=sources)


def dry_run_checks(cfg: ServeConfig) -> tuple[str | None, str]:
    """Return (first problem or None, one-line summary). Never downloads, never starts a server."""
    try:
        model_line = _check_model(cfg)
        port_line = check_port_free(cfg.host, cfg.port)
        device_line = _check_device(cfg)
    except _Problem as exc:
        return str(exc), ""
    return None, f"config valid; model {model_line}; {port_line}; device {device_line}"


class _Problem(Exception):
    pass


def _plan(cfg: ServeConfig, sources):
    """The plan for a remote backend (no download: config.json must be local or cached); _Problem if none."""
    from fleetserve.planner.serve import plan_for_config
    from fleetserve.planner.types import PlanError

    try:
        return plan_for_config(cfg, sources, download=False)
    except PlanError as exc:
        raise _Problem(f"no plan for the {cfg.backend} backend: {exc}") from None


def _print_plan(cfg: ServeConfig, sources, out: Console, err: Console) -> None:
    from fleetserve.cli.plan import render_plan

    try:
        plan = _plan(cfg, sources)
    except _Problem as exc:
        _err(err, str(exc))
        raise typer.Exit(EXIT_CONFIG) from None
    render_plan(plan, out)


def remote_dry_run_checks(cfg: ServeConfig, sources=None, out: Console | None = None) -> tuple[str | None, str]:
    """sglang / vllm: the plan (GPUs, model config, memory), the ports, the engine install. Nothing starts.

    With `out`, the plan is printed there first.
    """
    from fleetserve.engine.remote.launcher import missing_engine
    from fleetserve.planner.serve import summary

    try:
        plan = _plan(cfg, sources)
        if out is not None:
            from fleetserve.cli.plan import render_plan

            render_plan(plan, out)
        port_line = check_port_free(cfg.host, cfg.port)
        engine_ports = sorted({(p.host, p.port) for p in plan.processes}
                              | {(p.host, p.bootstrap_port) for p in plan.processes if p.bootstrap_port})
        for host, port in engine_ports:
            if (host, port) == (cfg.host, cfg.port) or (port == cfg.port and "0.0.0.0" in (host, cfg.host)):
                raise _Problem(f"engine port {port} is fleetserve's own port; choose another with --engine-port "
                               "(or --port)")
            try:
                check_port_free(host, port)
            except _Problem as exc:
                raise _Problem(f"engine port: {exc}".replace("--port", "--engine-port")) from None
        if (missing := missing_engine(plan.processes)) is not None:
            raise _Problem(missing)
    except _Problem as exc:
        return str(exc), ""
    ports = ", ".join(str(port) for _, port in engine_ports)
    return None, f"config valid; plan {summary(plan)}; {port_line}; engine ports {ports} free; engine installed"


def _check_model(cfg: ServeConfig) -> str:
    try:
        from fleetserve.models import ModelResolutionError, resolve_model
    except ImportError as exc:
        raise _Problem(f"cannot check the model: fleetserve.models is unavailable ({exc})") from None
    token = cfg.hf_token.get_secret_value() if cfg.hf_token is not None else None
    try:
        files = resolve_model(cfg.model, revision=cfg.revision, hf_token=token, download=False, progress=False)
    except ModelResolutionError as exc:
        message = f"model {cfg.model!r} is not usable: {exc}"
        if "models pull" not in message and not cfg.model.startswith(("/", ".", "~")):
            message += f"; run `fleetserve models pull {cfg.model}` to download it"
        if token:
            message = message.replace(token, "***")
        raise _Problem(message) from None
    return f"{files.name} ({files.format}, {files.source}) at {files.path}"


def check_port_free(host: str, port: int) -> str:
    """Bind (with SO_REUSEADDR, as uvicorn does) and release the address the server will listen on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise _Problem(f"host {host!r} cannot be resolved ({exc.strerror}); use an IP address such as "
                       "127.0.0.1 or 0.0.0.0 with --host") from None
    family, socktype, proto, _, address = infos[0]
    try:
        with socket.socket(family, socktype, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise _Problem(f"port {port} on {host} is already in use; stop the process using it or choose "
                           "another with --port") from None
        if exc.errno == errno.EACCES:
            raise _Problem(f"permission denied binding {host}:{port}; ports below 1024 need privileges, "
                           "choose another with --port") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise _Problem(f"host {host!r} is not an address of this machine; use 127.0.0.1, 0.0.0.0 or one "
                           "of its interface addresses with --host") from None
        raise _Problem(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None
    return f"{host}:{port} free"


def _check_device(cfg: ServeConfig) -> str:
    from fleetserve.device import resolve_device, resolve_dtype

    try:
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.precision, device)
    except ValueError as exc:
        raise _Problem(str(exc)) from None
    if cfg.attention_backend == "triton" and device.type != "cuda":
        raise _Problem(f"attention_backend 'triton' runs on CUDA GPUs; the device here is {device} (use auto or torch)")
    if cfg.attention_backend == "cpu" and device.type != "cpu":
        raise _Problem(f"attention_backend 'cpu' runs on CPUs; the device here is {device} (use auto or triton)")
    return f"{device} ({str(dtype).removeprefix('torch.')})"
