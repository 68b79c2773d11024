"""Builds a LlamaModel on a device from resolved model files, without a throwaway random init."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fleetserve.engine.native.model import LlamaModel
from fleetserve.engine.native.model_config import ModelConfig
from fleetserve.engine.native.parallel import SINGLE, TPGroup, check_tp
from fleetserve.engine.native.weights import load_model_config_and_weights

log = logging.getLogger("fleetserve.engine")


def activation_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the model computes in for the requested one. On a CPU, bf16 means bf16 weights and matmuls
    (oneDNN's bf16 GEMMs are ~1.7x faster than fp32 there, and read half the bytes) with fp32 activations:
    norms, RoPE, attention and the residual stream stay fp32, where CPU bf16 kernels are slower than fp32
    and lose precision (docs/perf.md "bf16 on CPU"). The KV cache keeps the requested dtype."""
    return torch.float32 if device.type == "cpu" and dtype == torch.bfloat16 else dtype


def load_model(
    fmt: str, path: Path, device: torch.device, dtype: torch.dtype, max_len: int | None = None,
    progress: bool = False, quantization: str | None = None, tp: TPGroup = SINGLE,
) -> tuple[LlamaModel, ModelConfig]:
    """With `tp`, this rank's shard of the model (every rank reads the whole checkpoint and keeps its slice)."""
    cfg, weights = load_model_config_and_weights(fmt, path, progress)
    check_tp(cfg, tp.size)
    max_len = max_len or cfg.max_position_embeddings
    with torch.device("meta"):
        model = LlamaModel(cfg, max_len, tp)
    act = activation_dtype(device, dtype)
    model = model.to_empty(device=device)
    model.load_weights((name, w.to(device=device, dtype=act)) for name, w in weights)
    model.to(dtype=act)
    model.init_rope(device)
    model.eval().requires_grad_(False)
    if quantization == "fp8":
        done, skipped = model.quantize_fp8()
        log.info("FP8 weights: %d linear layers quantized, %d kept (dimensions not multiples of 16)%s",
                 done, skipped, "; on CPU FP8 matmuls are emulated (slow)" if device.type == "cpu" else "")
    elif quantization is not None:
        raise ValueError(f"quantization {quantization!r} is not supported by the native engine (only fp8)")
    model.prepack(dtype if act != dtype else None)
    return model, cfg
