"""SGLang command lines from a plan's decisions: `sglang.launch_server` and, in PD mode, the router.

Every flag emitted here exists in SGLang 0.5.23's `ServerArgs.add_cli_args` and in sglang-router
0.3.2's `launch_router` parser; the tests parse each generated argv with those parsers.
"""

from __future__ import annotations

from fleetserve.planner.types import EngineSettings

SERVER_MODULE = "sglang.launch_server"
ROUTER_MODULE = "sglang_router.launch_router"
SGLANG_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SPECULATIVE_NAMES = {"eagle": "EAGLE", "eagle3": "EAGLE3", "ngram": "NGRAM"}


def server_argv(s: EngineSettings, *, role: str, tp_size: int, port: int,
                bootstrap_port: int | None = None, context_length: int | None = None) -> list[str]:
    """`python -m sglang.launch_server ...` for one engine (role unified, prefill or decode)."""
    argv = [s.python, "-m", SERVER_MODULE, "--model-path", s.model]
    if s.revision:
        argv += ["--revision", s.revision]
    if s.served_model_name:
        argv += ["--served-model-name", s.served_model_name]
    argv += ["--tp-size", str(tp_size), "--host", s.host, "--port", str(port)]
    if s.dtype:
        argv += ["--dtype", s.dtype]
    if s.quantization:
        argv += ["--quantization", s.quantization]
    if s.kv_cache_dtype:
        argv += ["--kv-cache-dtype", s.kv_cache_dtype]
    if context_length:
        argv += ["--context-length", str(context_length)]
    if s.max_total_tokens:
        argv += ["--max-total-tokens", str(s.max_total_tokens)]
    if s.mem_fraction_static is not None:
        argv += ["--mem-fraction-static", _num(s.mem_fraction_static)]
    if s.schedule_conservativeness is not None:
        argv += ["--schedule-conservativeness", _num(s.schedule_conservativeness)]
    if s.max_queued_requests is not None:
        argv += ["--max-queued-requests", str(s.max_queued_requests)]
    if s.enable_metrics:
        argv.append("--enable-metrics")
    if s.enable_p2p_check:
        argv.append("--enable-p2p-check")
    if s.enable_torch_compile:
        argv.append("--enable-torch-compile")
    argv += ["--log-level", s.log_level]
    if role in ("prefill", "decode"):
        argv += ["--disaggregation-mode", role]
        if role == "prefill" and bootstrap_port is not None:
            argv += ["--disaggregation-bootstrap-port", str(bootstrap_port)]
        if s.pd_transfer_backend:
            argv += ["--disaggregation-transfer-backend", s.pd_transfer_backend]
        if s.pd_ib_device:
            argv += ["--disaggregation-ib-device", s.pd_ib_device]
    argv += speculative_args(s)
    return argv


def speculative_args(s: EngineSettings) -> list[str]:
    if s.speculative == "none":
        return []
    argv = ["--speculative-algorithm", SPECULATIVE_NAMES[s.speculative]]
    if s.speculative_draft_model_path:
        argv += ["--speculative-draft-model-path", s.speculative_draft_model_path]
    if s.speculative_num_steps is not None:
        argv += ["--speculative-num-steps", str(s.speculative_num_steps)]
    if s.speculative_eagle_topk is not None:
        argv += ["--speculative-eagle-topk", str(s.speculative_eagle_topk)]
    if s.speculative_num_draft_tokens is not None:
        argv += ["--speculative-num-draft-tokens", str(s.speculative_num_draft_tokens)]
    if s.speculative_token_map:
        argv += ["--speculative-token-map", s.speculative_token_map]
    if s.speculative_attention_mode:
        argv += ["--speculative-attention-mode", s.speculative_attention_mode]
    return argv


def router_argv(s: EngineSettings, *, port: int, prefill: list[tuple[str, int | None]], decode: list[str]) -> list[str]:
    """`python -m sglang_router.launch_router --pd-disaggregation --prefill URL BOOTSTRAP ... --decode URL ...`."""
    argv = [s.python, "-m", ROUTER_MODULE, "--pd-disaggregation"]
    for url, bootstrap in prefill:
        argv += ["--prefill", url] + ([str(bootstrap)] if bootstrap is not None else [])
    for url in decode:
        argv += ["--decode", url]
    if len(decode) > 1:
        argv += ["--decode-policy", "round_robin"]  # seed 002: round-robin across decode replicas
    argv += ["--host", s.host, "--port", str(port), "--log-level", s.log_level]
    return argv


def _num(value: float) -> str:
    return f"{value:g}"
