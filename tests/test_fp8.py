"""FP8 weights (per-channel scales, torch._scaled_mm) and the FP8 KV cache: numerics, sizing, quality."""

from __future__ import annotations

import asyncio

import pytest
import torch

from fleetserve.config import ConfigError, ServeConfig, check_backend
from fleetserve.engine.native import fp8
from fleetserve.engine.native.engine import EngineConfig, NativeEngine
from fleetserve.engine.types import GenerationRequest, SamplingParams

TEXT = ("The history of the city begins with a small settlement on the river bank. Over the centuries it grew into "
        "a trading hub, connecting the northern forests with the southern plains. Merchants brought salt, iron and "
        "cloth; scholars followed, founding a library that still stands today.")


def test_weight_quantization_keeps_each_row_within_fp8_precision():
    torch.manual_seed(0)
    w = torch.randn(64, 32) * torch.logspace(-3, 2, 64)[:, None]  # rows five decades apart: per-row scales matter
    q, scale = fp8.quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (1, 64)
    back = q.float() * scale.t()
    rel = ((back - w).abs() / w.abs().amax(dim=1, keepdim=True)).amax()
    assert rel <= 2**-4  # e4m3: 3 mantissa bits, relative to each row's largest value
    assert (q.float().abs().amax(dim=1) == fp8.FP8_MAX).all()  # each row uses the full range


def test_fp8_linear_matches_the_full_precision_product():
    torch.manual_seed(1)
    x, w, b = torch.randn(5, 3, 64), torch.randn(48, 64), torch.randn(48)
    q, scale = fp8.quantize_weight(w)
    out = fp8.fp8_linear(x, q, scale, b)
    ref = torch.nn.functional.linear(x, w, b)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert (out - ref).norm() / ref.norm() < 0.05
    assert not fp8.fp8_supported(60, 48) and fp8.fp8_supported(64, 48)


def test_fp8_kv_store_saturates_instead_of_overflowing():
    cache = torch.zeros(4, 2, 1, 2, dtype=torch.float8_e4m3fn)
    fp8.store(cache, torch.tensor([0, 7]), torch.tensor([[[1e6, -3.0]], [[0.5, -1e9]]]))
    flat = cache.view(-1, 1, 2).float()
    assert flat[0].tolist() == [[448.0, -3.0]] and flat[7].tolist() == [[0.5, -448.0]]
    assert flat[1:7].abs().sum() == 0
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        fp8.kv_storage_dtype("int4", torch.float32)


def test_fp8_kv_cache_holds_four_times_the_fp32_tokens(make_engine, default_model):
    _, cfg = default_model
    engine = make_engine(kv_cache_memory=64 << 20, kv_cache_dtype="fp8_e4m3")
    assert engine.kv_cache.layers[0][0].dtype == torch.float8_e4m3fn
    assert engine.block_manager.num_blocks == (64 << 20) // (cfg.kv_bytes_per_token(1) * 16)


async def _prompt_logprobs(engine: NativeEngine, ids: list[int]) -> list:
    stream = await engine.generate(GenerationRequest(f"pl{id(engine)}", ids, SamplingParams(
        max_tokens=0, prompt_logprobs=1)))
    return [ev async for ev in stream][0].prompt_logprobs[1:]


def test_fp8_model_stays_close_to_fp32_on_the_embedded_model(default_engine, default_gguf, tokenizer):
    """Teacher-forced top-1 agreement with fp32 (measured 90% for bf16 + FP8 weights + FP8 KV; bf16 alone 96%)."""
    fp8_engine = NativeEngine.load("gguf", default_gguf, tokenizer.eos_token_ids, EngineConfig(
        max_model_len=512, kv_cache_tokens=1024, quantization="fp8", kv_cache_dtype="fp8_e4m3"),
        torch.device("cpu"), torch.bfloat16)
    fp8_engine.start()
    try:
        layer = fp8_engine.runner.model.layers[0].mlp.down_proj
        assert layer.qweight.dtype == torch.float8_e4m3fn and layer.weight.numel() == 0
        assert fp8_engine.runner.model.lm_head.qweight is None  # the LM head keeps the model dtype
        ids = tokenizer.encode(TEXT)
        ref = asyncio.run(_prompt_logprobs(default_engine, ids))
        low = asyncio.run(_prompt_logprobs(fp8_engine, ids))
    finally:
        fp8_engine.stop()
    agreement = sum(a.top[0][0] == b.top[0][0] for a, b in zip(ref, low)) / len(ref)
    assert agreement >= 0.8
    nll = [-sum(x.logprob for x in lps) / len(lps) for lps in (ref, low)]
    assert nll[1] - nll[0] < 0.1  # perplexity rises by less than ~10%


def test_native_backend_accepts_fp8_and_rejects_other_quantizations():
    check_backend(ServeConfig(quantization="fp8", kv_cache_dtype="fp8_e5m2"))
    with pytest.raises(ConfigError, match="quantization"):
        check_backend(ServeConfig(quantization="awq"))
    with pytest.raises(ConfigError, match="--quantization fp8"):
        check_backend(ServeConfig(precision="fp8"))
