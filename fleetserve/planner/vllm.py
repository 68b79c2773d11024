"""vLLM command lines from a plan's decisions: `vllm serve MODEL ...`.

The flags are checked in the tests against a fixture of `vllm serve --help` written from vLLM's
engine-argument docs. Settings vLLM has no flag for are returned as warnings, never dropped silently.
"""

from __future__ import annotations

import json

from fleetserve.planner.types import EngineSettings

VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
VLLM_LOG_LEVELS = {"debug": "debug", "info": "info", "warning": "warning", "error": "error"}


def serve_argv(s: EngineSettings, *, tp_size: int, port: int, context_length: int | None = None) -> list[str]:
    argv = ["vllm", "serve", s.model, "--host", s.host, "--port", str(port), "--tensor-parallel-size", str(tp_size)]
    if s.revision:
        argv += ["--revision", s.revision]
    if s.served_model_name:
        argv += ["--served-model-name", s.served_model_name]
    if s.dtype:
        argv += ["--dtype", s.dtype]
    if s.quantization:
        argv += ["--quantization", s.quantization]
    if s.kv_cache_dtype:
        argv += ["--kv-cache-dtype", s.kv_cache_dtype]
    if context_length:
        argv += ["--max-model-len", str(context_length)]
    if s.mem_fraction_static is not None:
        argv += ["--gpu-memory-utilization", f"{s.mem_fraction_static:g}"]
    if s.speculative != "none":
        argv += ["--speculative-config", json.dumps(speculative_config(s), separators=(",", ":"))]
    argv += ["--uvicorn-log-level", VLLM_LOG_LEVELS[s.log_level]]
    return argv


def speculative_config(s: EngineSettings) -> dict:
    if s.speculative == "ngram":
        n = s.speculative_num_draft_tokens or s.speculative_num_steps or 4
        return {"method": "ngram", "num_speculative_tokens": n, "prompt_lookup_max": 4}
    cfg = {"method": s.speculative, "model": s.speculative_draft_model_path,
           "num_speculative_tokens": s.speculative_num_steps}
    return cfg


def unsupported(s: EngineSettings) -> list[str]:
    """Settings vLLM cannot take, each as a warning that says what happens instead."""
    out = []
    if s.max_total_tokens:
        out.append(f"max_total_tokens={s.max_total_tokens} has no vLLM flag: vLLM sizes its KV pool from "
                   "--gpu-memory-utilization (mem_fraction_static)")
    if s.schedule_conservativeness is not None:
        out.append("schedule_conservativeness is an SGLang setting; vLLM ignores it (not passed)")
    if s.max_queued_requests is not None:
        out.append("max_queued_requests has no vLLM flag: fleetserve's own queue limit applies in front of it")
    if s.enable_p2p_check:
        out.append("enable_p2p_check is an SGLang setting; vLLM checks GPU peer access itself (not passed)")
    if s.enable_torch_compile:
        out.append("enable_torch_compile: vLLM compiles with torch.compile by default (nothing to pass)")
    if not s.enable_metrics:
        out.append("enable_metrics=false: vLLM always serves /metrics")
    if s.speculative in ("eagle", "eagle3") and (s.speculative_eagle_topk or s.speculative_num_draft_tokens):
        out.append("vLLM's EAGLE drafts a chain of num_speculative_tokens (= speculative_num_steps); "
                   "speculative_eagle_topk and speculative_num_draft_tokens (SGLang's tree) are not used")
    if s.speculative_token_map or s.speculative_attention_mode:
        out.append("speculative_token_map / speculative_attention_mode are SGLang settings; not passed to vLLM")
    return out
