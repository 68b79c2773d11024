"""Paged attention in Triton: the GPU path of `attention.paged_attention` (the torch code there is the CPU path).

Two kernels read K/V straight from the paged cache ([num_blocks, block_size, Hkv, D] per layer) through
the block tables, with no gather copy:

- decode: one query token per sequence. One program per (sequence, KV head, split) computes all the query
  heads that share the KV head (GQA: the group is the rows of one `tl.dot`), with an online softmax over
  the sequence's context. Long contexts are split over several programs (flash-decoding); a second kernel
  merges the splits by their log-sum-exp.
- prefill: a batch of chunks (varlen, `query_start` = cu_seqlens over the flat batch). One program per
  (chunk, query head, tile of BLOCK_M queries) attends to the sequence's cached prefix plus causally to the
  chunk itself, whose K/V are already in the cache (`paged_attention` writes them first).

Both take an optional sliding window, fp32/fp16/bf16 inputs, and accumulate in fp32. Sequences are rows
of one block-table / context-length tensor: decodes first, then chunks (`seq_offset` says where the
kernel's rows start). This module imports triton at the top: import it only when that is wanted (CUDA,
or Triton's interpreter under TRITON_INTERPRET=1, which must be set before this module is first imported).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
DECODE_BLOCK_N = 32  # context tokens per decode iteration
PREFILL_BLOCK_M = 32  # queries per prefill program
PREFILL_BLOCK_N = 32  # keys per prefill iteration
MIN_SPLIT_TOKENS = 256  # a decode split covers at least this many context tokens
MAX_SPLITS = 16


@triton.jit
def _load_kv(base, bt_row, pos, pmask, block_size, stride_t, d):
    """[BLOCK_N, D] of one KV head for context positions `pos`, through the sequence's block table."""
    page = tl.load(bt_row + pos // block_size, mask=pmask, other=0)
    slot = page.to(tl.int64) * block_size + pos % block_size
    return tl.load(base + slot[:, None] * stride_t + d[None, :], mask=pmask[:, None], other=0.0)


@triton.jit
def _tile(base_k, base_v, bt_row, pos, pmask, block_size, stride_kt, stride_vt, d, F32: tl.constexpr):
    """K and V tiles for positions `pos` (in fp32 when the kernel computes in fp32)."""
    k = _load_kv(base_k, bt_row, pos, pmask, block_size, stride_kt, d)
    v = _load_kv(base_v, bt_row, pos, pmask, block_size, stride_vt, d)
    if F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _online_softmax_step(q, k, v, allowed, m_i, l_i, acc, sm_scale):
    """One key tile of flash attention's running softmax (base 2: sm_scale includes log2 e)."""
    qk = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale
    qk = tl.where(allowed, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _cast_out(x, ptr, F32: tl.constexpr):
    """x (fp32) in the output's dtype. The interpreter (F32) truncates fp32 -> bf16: round to nearest even
    first, as the GPU and torch do."""
    if F32:
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _decode_kernel(
    Q, K, V, Out, Lse, BlockTables, ContextLens, seq_offset, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_os, stride_bt, block_size, window,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr, F32: tl.constexpr,
):
    b = tl.program_id(0)
    hkv = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ContextLens + seq_offset + b)
    lo = 0
    if HAS_WINDOW:  # the query sits at ctx - 1: keys at positions > ctx - 1 - window
        lo = tl.maximum(ctx - window, 0)
    per_split = tl.cdiv(tl.cdiv(ctx - lo, SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, ctx)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    heads = hkv * G + g
    gmask = g < G
    q = tl.load(Q + b * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
    if F32:
        q = q.to(tl.float32)
    bt_row = BlockTables + (seq_offset + b).to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)  # finite: an all-masked tile leaves the state as it is
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for s in range(start, end, BLOCK_N):
        pos = s + n
        pmask = pos < end
        k, v = _tile(K + hkv * stride_kh, V + hkv * stride_vh, bt_row, pos, pmask, block_size, stride_kt,
                     stride_vt, d, F32)
        m_i, l_i, acc = _online_softmax_step(q, k, v, pmask[None, :], m_i, l_i, acc, sm_scale)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptr = Out + b * stride_ot + heads[:, None] * stride_oh + split * stride_os + d[None, :]
    if SPLITS == 1:
        tl.store(o_ptr, _cast_out(out, Out, F32), mask=gmask[:, None])
    else:  # partial result (fp32) and its log2-sum-exp; an empty split has weight 0
        tl.store(o_ptr, out, mask=gmask[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(Lse + (b * (stride_ot // stride_oh) + heads) * SPLITS + split, lse, mask=gmask)


@triton.jit
def _decode_merge_kernel(P, Lse, Out, stride_pt, stride_ph, stride_ps, stride_ot, stride_oh,
                         SPLITS: tl.constexpr, D: tl.constexpr, F32: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    lse = tl.load(Lse + (b * (stride_pt // stride_ph) + h) * SPLITS + s)
    w = tl.exp2(lse - tl.max(lse, 0))
    part = tl.load(P + b * stride_pt + h * stride_ph + s[:, None] * stride_ps + d[None, :])
    out = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
    tl.store(Out + b * stride_ot + h * stride_oh + d, _cast_out(out, Out, F32))


@triton.jit
def _prefill_kernel(
    Q, K, V, Out, BlockTables, ContextLens, QueryStart, seq_offset, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_bt,
    block_size, window,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, F32: tl.constexpr,
):
    seq = tl.program_id(0)
    h = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(QueryStart + seq_offset + seq)
    q_len = tl.load(QueryStart + seq_offset + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    ctx = tl.load(ContextLens + seq_offset + seq)
    first = ctx - q_len + tile * BLOCK_M  # position of the tile's first query
    m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    mmask = tile * BLOCK_M + m < q_len
    q_pos = first + m
    rows = (q_start + tile * BLOCK_M + m).to(tl.int64)
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + d[None, :], mask=mmask[:, None], other=0.0)
    if F32:
        q = q.to(tl.float32)
    hkv = h // G
    bt_row = BlockTables + (seq_offset + seq).to(tl.int64) * stride_bt
    hi = tl.minimum(first + BLOCK_M, ctx)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(first - window + 1, 0)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for s in range(lo, hi, BLOCK_N):
        pos = s + n
        pmask = pos < hi
        k, v = _tile(K + hkv * stride_kh, V + hkv * stride_vh, bt_row, pos, pmask, block_size, stride_kt,
                     stride_vt, d, F32)
        allowed = pmask[None, :] & (pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            allowed = allowed & (pos[None, :] > q_pos[:, None] - window)
        m_i, l_i, acc = _online_softmax_step(q, k, v, allowed, m_i, l_i, acc, sm_scale)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(Out + rows[:, None] * stride_ot + h * stride_oh + d[None, :], _cast_out(out, Out, F32),
             mask=mmask[:, None])


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_decode_kernel, InterpretedFunction)


# The kernels were built for Triton's interpreter (TRITON_INTERPRET=1 when this module was imported): they
# run on CPU tensors, slowly; for tests.
INTERPRETED = _interpreted()


_SM_COUNT: dict[int, int] = {}


def _num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Flash-decoding splits: enough programs to fill the GPU when batch x KV heads alone does not, each
    split covering at least MIN_SPLIT_TOKENS of context."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _SM_COUNT:
            _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        sms = _SM_COUNT[idx]
    else:
        sms = 1  # the interpreter runs programs one after another: fewer is faster
    want = min(-(-2 * sms // (batch * num_kv_heads)), -(-max_context // MIN_SPLIT_TOKENS), MAX_SPLITS)
    return 1 << max(0, math.ceil(math.log2(max(want, 1))))


def _check(q: torch.Tensor, k_cache: torch.Tensor) -> tuple[int, int, int]:
    hq, d = q.shape[1], q.shape[2]
    hkv = k_cache.shape[2]
    assert d >= 16 and d & (d - 1) == 0, f"the Triton attention kernels need a power-of-two head_dim >= 16, not {d}"
    assert hq % hkv == 0, f"{hq} query heads do not group over {hkv} KV heads"
    assert q.stride(2) == 1 and k_cache.is_contiguous(), "q rows and the KV cache must be contiguous"
    return hq, hkv, d


def decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale: float, max_context: int,
                     sliding_window: int | None = None, seq_offset: int = 0, out: torch.Tensor | None = None,
                     num_splits: int | None = None) -> torch.Tensor:
    """q [B, Hq, D], one token per sequence; sequence b is row seq_offset + b of block_tables [*, max_blocks]
    and context_lens [*] (its tokens in the cache, the query's own included). Returns [B, Hq, D]."""
    b, hq, d = q.shape
    _, hkv, _ = _check(q, k_cache)
    g = hq // hkv
    out = torch.empty_like(q) if out is None else out
    if b == 0:
        return out
    splits = num_splits or _num_splits(b, hkv, max_context, q.device)
    assert splits & (splits - 1) == 0, "num_splits must be a power of two"
    kf, vf = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    f32 = INTERPRETED and q.dtype == torch.bfloat16  # the interpreter's bf16 arithmetic is broken
    common = dict(G=g, BLOCK_G=max(16, triton.next_power_of_2(g)), D=d, BLOCK_N=DECODE_BLOCK_N, SPLITS=splits,
                  HAS_WINDOW=bool(sliding_window), F32=f32)
    if splits == 1:
        _decode_kernel[(b, hkv, 1)](
            q, kf, vf, out, out, block_tables, context_lens, seq_offset, scale * LOG2E,
            q.stride(0), q.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1),
            out.stride(0), out.stride(1), 0, block_tables.stride(0), k_cache.shape[1], sliding_window or 0,
            **common)
        return out
    part = torch.empty((b, hq, splits, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((b, hq, splits), dtype=torch.float32, device=q.device)
    _decode_kernel[(b, hkv, splits)](
        q, kf, vf, part, lse, block_tables, context_lens, seq_offset, scale * LOG2E,
        q.stride(0), q.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1),
        part.stride(0), part.stride(1), part.stride(2), block_tables.stride(0), k_cache.shape[1],
        sliding_window or 0, **common)
    _decode_merge_kernel[(b, hq)](part, lse, out, part.stride(0), part.stride(1), part.stride(2),
                                  out.stride(0), out.stride(1), SPLITS=splits, D=d, F32=f32)
    return out


def prefill_attention(q, k_cache, v_cache, block_tables, context_lens, query_start, scale: float,
                      num_seqs: int, max_query_len: int, sliding_window: int | None = None, seq_offset: int = 0,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Chunks of several sequences: the queries of sequence i are rows query_start[j]:query_start[j + 1] of
    q [T, Hq, D] (j = seq_offset + i), at the last positions of its context_lens[j] tokens in the cache
    (a cached prefix, then the chunk itself). Writes those rows of `out` (a new [T, Hq, D] if None)."""
    _, hq, d = q.shape
    _, hkv, _ = _check(q, k_cache)
    out = torch.empty_like(q) if out is None else out
    if num_seqs == 0:
        return out
    kf, vf = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    grid = (num_seqs, hq, triton.cdiv(max_query_len, PREFILL_BLOCK_M))
    _prefill_kernel[grid](
        q, kf, vf, out, block_tables, context_lens, query_start, seq_offset, scale * LOG2E,
        q.stride(0), q.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0), k_cache.shape[1], sliding_window or 0,
        G=hq // hkv, D=d, BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N, HAS_WINDOW=bool(sliding_window),
        F32=INTERPRETED and q.dtype == torch.bfloat16)
    return out
