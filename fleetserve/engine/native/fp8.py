"""FP8 (e4m3) weights and KV cache.

Weights: one scale per output channel, computed at load; activations: one scale per token, computed per
call; the product runs in `torch._scaled_mm` (FP8 tensor cores on Hopper; on CPU it is emulated and slow,
so there it serves quality checks, not speed). The LM head stays in the model dtype, as vLLM and SGLang
keep it by default: its logits decide every token.

KV cache: stored as float8 (e4m3 or e5m2) with a scale of 1.0 (what vLLM and SGLang use without a
calibrated checkpoint), values saturating at the format's maximum; attention reads them back in the
model dtype.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
KV_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def fp8_supported(in_features: int, out_features: int) -> bool:
    """_scaled_mm wants both matrix dimensions it does not own to be multiples of 16."""
    return in_features % 16 == 0 and out_features % 16 == 0


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (fp8 [out, in], fp32 scale [1, out]) with w ~= q * scale per row."""
    scale = w.float().abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
    q = (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale[None, :].contiguous()


def fp8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
               ) -> torch.Tensor:
    """x [..., in] in the model dtype; per-token dynamic scaling of the activations."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x_scale = x2.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    qx = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    out = torch._scaled_mm(qx, qweight.t(), scale_a=x_scale, scale_b=w_scale, bias=bias, out_dtype=x.dtype)
    return out.view(*shape[:-1], -1)


def kv_storage_dtype(kv_cache_dtype: str | None, model_dtype: torch.dtype) -> torch.dtype:
    if kv_cache_dtype in (None, "auto"):
        return model_dtype
    if kv_cache_dtype not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not one of auto, {', '.join(KV_DTYPES)}")
    return KV_DTYPES[kv_cache_dtype]


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def store(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """cache [num_blocks, block_size, H, D] <- values [T, H, D] at flat slots (saturating cast for fp8)."""
    h, d = values.shape[1], values.shape[2]
    if not is_fp8(cache.dtype):  # a bf16 cache under fp32 activations (the CPU's bf16 mode) rounds here
        cache.view(-1, h, d).index_copy_(0, slots, values.to(cache.dtype))
        return
    limit = torch.finfo(cache.dtype).max
    q = values.float().clamp(-limit, limit).to(cache.dtype)
    cache.view(torch.uint8).view(-1, h, d).index_copy_(0, slots, q.view(torch.uint8))  # no fp8 index_copy on CPU
