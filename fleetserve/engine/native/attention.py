"""Attention over a paged KV cache: plain PyTorch, a C decode kernel for CPUs (cpu_kernels.py), or Triton
kernels for GPUs (triton_attention.py).

The batch is flattened: decode tokens first, then prefill chunks. Backends:

* "torch": the decodes attend together in one padded SDPA call over their gathered blocks; each prefill
  chunk is one SDPA call (a chunk with no cached context attends to its own keys directly, others gather
  their blocks).
* "cpu": the decodes go through the C kernel, which reads the blocks in place (a batch-16 decode layer:
  ~120 us instead of ~450 us for the gathers and SDPA); prefill chunks as with "torch".
* "triton": one decode kernel for all decodes, one varlen prefill kernel for all chunks, both in place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fleetserve.engine.native import cpu_kernels, fp8


@dataclass
class PrefillSegment:
    start: int  # first token of the chunk in the flattened batch
    end: int
    context_len: int  # tokens of this sequence in the cache after this step (cached prefix + chunk)
    block_table: torch.Tensor | None  # needed only when the chunk has context before it


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat cache slot for every token's K/V
    num_decode: int = 0
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks]
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, max_blocks * block_size], True = attend ("torch")
    decode_context_lens: torch.Tensor | None = None  # [B] int32 ("cpu"; its decode_block_tables are int32)
    prefills: list[PrefillSegment] = field(default_factory=list)
    backend: str = "torch"
    # backend "triton" only (the torch fields above stay unset then, and these unset otherwise): one row
    # per sequence, decodes first, then the prefill chunks in batch order
    block_tables: torch.Tensor | None = None  # [S, max_blocks] int32
    context_lens: torch.Tensor | None = None  # [S] int32: tokens in the cache after this step
    query_start: torch.Tensor | None = None  # [S + 1] int32: cu_seqlens of the sequences' rows in the batch
    max_decode_context: int = 0
    max_query_len: int = 0  # longest prefill chunk


ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")


def triton_import_error() -> str | None:
    """None when the Triton kernels import (this imports triton: call it only where they may be used)."""
    try:
        from fleetserve.engine.native import triton_attention  # noqa: F401
    except Exception as exc:  # ImportError, or a triton that fails on this machine
        return f"{type(exc).__name__}: {exc}"
    return None


def resolve_attention_backend(name: str, device: torch.device, kv_dtype: torch.dtype | None = None) -> str:
    """"auto" -> "triton" on CUDA when triton imports, else "torch"; on a CPU "cpu" when the C kernel builds
    here, else "torch". "triton" off CUDA runs only under Triton's interpreter (TRITON_INTERPRET=1 before the
    kernels are first imported): slow, for tests. The Triton kernels read the cache in the model dtype and
    the C kernel fp32 or bf16: an FP8 KV cache goes through the torch path."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, not {name!r}")
    if name == "cpu" or (name == "auto" and device.type == "cpu"):
        return _resolve_cpu(name, device, kv_dtype or torch.float32)
    if kv_dtype is not None and fp8.is_fp8(kv_dtype):
        if name == "triton":
            raise ValueError("attention_backend 'triton' does not read an FP8 KV cache yet; use 'auto' or 'torch'")
        return "torch"
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return "torch"
    error = triton_import_error()
    if name == "auto":
        return "torch" if error else "triton"
    if error:
        raise ValueError(f"attention_backend 'triton' needs the triton package ({error})")
    from fleetserve.engine.native import triton_attention

    if device.type != "cuda" and not triton_attention.INTERPRETED:
        raise ValueError("attention_backend 'triton' on a CPU runs only under Triton's interpreter: set "
                         "TRITON_INTERPRET=1 before the kernels are imported (tests), or use 'torch'"
                         + ("" if os.environ.get("TRITON_INTERPRET") != "1" else
                            " (TRITON_INTERPRET was set after the kernels had been imported)"))
    return "triton"


def _resolve_cpu(name: str, device: torch.device, kv_dtype: torch.dtype) -> str:
    """"cpu" asked for explicitly fails loudly where it cannot run; "auto" quietly falls back to "torch"."""
    if device.type != "cpu":
        raise ValueError(f"attention_backend 'cpu' runs on CPUs; the device here is {device} (use auto or triton)")
    if kv_dtype not in cpu_kernels.KV_DTYPES:
        if name == "cpu":
            raise ValueError(f"attention_backend 'cpu' reads an fp32 or bf16 KV cache, not {kv_dtype}; "
                             "use 'auto' or 'torch'")
        return "torch"
    error = cpu_kernels.load_error()
    if error and name == "cpu":
        raise ValueError(f"attention_backend 'cpu' needs its C kernel, which did not build: {error}")
    return "torch" if error else "cpu"


def _chunk_mask(n: int, ctx: int, window: int | None, device) -> torch.Tensor:
    q_pos = torch.arange(ctx - n, ctx, device=device)[:, None]
    k_pos = torch.arange(ctx, device=device)[None, :]
    mask = k_pos <= q_pos
    if window:
        mask &= k_pos > q_pos - window
    return mask


def _gather_blocks(cache: torch.Tensor, block_table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache[block_table] with the blocks' tokens flattened: [..., blocks * block_size, Hkv, D].
    index_select copies whole rows; advanced indexing copies element by element (3-7x slower on CPU,
    and it was 37% of a batch-16 decode step)."""
    rows = cache.index_select(0, block_table.reshape(-1))
    rows = rows.view(*block_table.shape[:-1], -1, *cache.shape[2:])
    return rows.to(dtype) if rows.dtype != dtype else rows  # an fp8 cache is read back in the model dtype


def _decode_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                      sliding_window: int | None) -> torch.Tensor:
    """One query token per sequence against its gathered blocks, all sequences in one padded SDPA call
    (the sliding window is in decode_mask), or through the C kernel (backend "cpu")."""
    if meta.backend == "cpu":
        return cpu_kernels.decode_attention(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens,
                                            scale, sliding_window)
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    kk = _gather_blocks(k_cache, meta.decode_block_tables, q.dtype).transpose(1, 2)  # [B, Hkv, L, D]
    vv = _gather_blocks(v_cache, meta.decode_block_tables, q.dtype).transpose(1, 2)
    # the query heads sharing a KV head become that head's query rows: no GQA expansion of K/V
    o = F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, d), kk, vv, attn_mask=meta.decode_mask,
                                       scale=scale)
    return o.view(b, hq, d)


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    nd = meta.num_decode
    if meta.backend == "cpu" and nd and not meta.prefills:  # the C kernel stores the new K/V as it goes
        return cpu_kernels.decode_attention(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens,
                                            scale, sliding_window, k, v)
    fp8.store(k_cache, meta.slot_mapping, k)
    fp8.store(v_cache, meta.slot_mapping, v)
    if meta.backend == "triton":
        return _triton_attention(q, k_cache, v_cache, meta, scale, sliding_window)
    if nd and not meta.prefills:  # pure decode step (the common case): no output buffer to copy into
        return _decode_attention(q, k_cache, v_cache, meta, scale, sliding_window)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = _decode_attention(q[:nd], k_cache, v_cache, meta, scale, sliding_window)
    for seg in meta.prefills:
        n = seg.end - seg.start
        qi = q[seg.start : seg.end].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        if seg.context_len == n:
            kk = k[seg.start : seg.end].transpose(0, 1).unsqueeze(0)
            vv = v[seg.start : seg.end].transpose(0, 1).unsqueeze(0)
        else:
            kk = _gather_blocks(k_cache, seg.block_table, q.dtype)[: seg.context_len].transpose(0, 1).unsqueeze(0)
            vv = _gather_blocks(v_cache, seg.block_table, q.dtype)[: seg.context_len].transpose(0, 1).unsqueeze(0)
        if seg.context_len == n and not (sliding_window and n > sliding_window):
            o = F.scaled_dot_product_attention(qi, kk, vv, is_causal=True, scale=scale, enable_gqa=True)
        else:
            mask = _chunk_mask(n, seg.context_len, sliding_window, q.device)
            o = F.scaled_dot_product_attention(qi, kk, vv, attn_mask=mask, scale=scale, enable_gqa=True)
        out[seg.start : seg.end] = o.squeeze(0).transpose(0, 1)
    return out


def _triton_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, sliding_window: int | None):
    from fleetserve.engine.native import triton_attention as ta

    out = torch.empty_like(q)
    nd, np_ = meta.num_decode, len(meta.prefills)
    if nd:
        ta.decode_attention(q[:nd], k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                            meta.max_decode_context, sliding_window, out=out[:nd])
    if np_:
        ta.prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.query_start, scale,
                             np_, meta.max_query_len, sliding_window, seq_offset=nd, out=out)
    return out
