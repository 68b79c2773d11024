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
    model = model.to_empty(device=device)
    model.load_weights((name, w.to(device=device, dtype=dtype)) for name, w in weights)
    model.to(dtype=dtype)
    model.init_rope(device)
    model.eval().requires_grad_(False)
    if quantization == "fp8":
        done, skipped = model.quantize_fp8()
        log.info("FP8 weights: %d linear layers quantized, %d kept (dimensions not multiples of 16)%s",
                 done, skipped, "; on CPU FP8 matmuls are emulated (slow)" if device.type == "cpu" else "")
    elif quantization is not None:
        raise ValueError(f"quantization {quantization!r} is not supported by the native engine (only fp8)")
    model.prepack()
    return model, cfg
