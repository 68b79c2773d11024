"""The Triton paged-attention kernels (engine/native/triton_attention.py) against the torch reference path of
`paged_attention`, run on CPU by Triton's interpreter (on CUDA, when there is one, compiled for the GPU).

Triton reads TRITON_INTERPRET when `triton.language` and the kernels are imported (triton.jit) and again
when a kernel is launched, so it is set here, before anything imports triton, and left set for the rest of
the session (nothing else in the test process runs Triton code; on CPU the engine's "auto" backend is torch).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

if sys.platform != "linux" and importlib.util.find_spec("triton") is None:  # triton ships Linux wheels only
    pytest.skip("triton is not installed (a test dependency on Linux only)", allow_module_level=True)
if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/test_triton_attention.py set TRITON_INTERPRET=1; "
                           "its interpreter cannot run in this process (set TRITON_INTERPRET=1 for the session)")
    os.environ["TRITON_INTERPRET"] = "1"

from fleetserve.engine.native import triton_attention as ta  # noqa: E402
from fleetserve.engine.native import cpu_kernels  # noqa: E402
from fleetserve.engine.native.attention import (  # noqa: E402
    AttentionMetadata,
    paged_attention,
    resolve_attention_backend,
)
from tests.attention_cases import (  # noqa: E402
    ENGINE_CASE_IDS,
    ENGINE_CASES,
    compare,
    greedy_tokens_by_backend,
    torch_meta,
)
from tests.attention_cases import case as _make_case  # noqa: E402

DEVICE = torch.device("cpu" if ta.INTERPRETED else "cuda")


def _case(seqs, hkv, group, d, block_size, dtype, seed=0):
    return _make_case(seqs, hkv, group, d, block_size, dtype, seed, DEVICE)


def _torch_meta(seqs, tables, slot_mapping, nd, segments, block_size, window):
    return torch_meta(seqs, tables, slot_mapping, nd, segments, block_size, window, DEVICE)
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _triton_meta(seqs, tables, slot_mapping, nd, segments):
    width = max(len(t) for t in tables)
    starts = [0]
    for _, new in seqs:
        starts.append(starts[-1] + new)
    ctx = [c + n for c, n in seqs]
    return AttentionMetadata(
        slot_mapping=slot_mapping, num_decode=nd, prefills=segments, backend="triton",
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE),
        context_lens=torch.tensor(ctx, dtype=torch.int32, device=DEVICE),
        query_start=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        max_decode_context=max(ctx[:nd], default=0), max_query_len=max((n for _, n in seqs[nd:]), default=0))


def _compare(seqs, *, dtype=torch.float32, **kw):
    return compare(seqs, _triton_meta, TOL[dtype], dtype=dtype, device=DEVICE, **kw)


DECODES = [(0, 1), (15, 1), (16, 1), (44, 1), (129, 1)]  # context lengths 1, 16, 17, 45, 130


@pytest.mark.parametrize("dtype,hkv,group,window,block_size", [
    (torch.float32, 2, 1, None, 16),
    (torch.float32, 1, 3, None, 16),
    (torch.float32, 2, 3, 20, 16),
    (torch.float32, 2, 3, None, 8),
    (torch.bfloat16, 2, 3, None, 16),
    (torch.float16, 2, 1, 33, 16),
], ids=["fp32-mha", "fp32-gqa3", "fp32-gqa3-window", "fp32-block8", "bf16-gqa3", "fp16-window"])
def test_decode_matches_reference(dtype, hkv, group, window, block_size):
    seqs = [(c, n) for c, n in DECODES if c]  # decodes have a cached prefix; context 1 is a 1-token prefill
    _compare(seqs, hkv=hkv, group=group, dtype=dtype, window=window, block_size=block_size)


@pytest.mark.parametrize("splits", [2, 8])
@pytest.mark.parametrize("window", [None, 50])
def test_decode_split_k_matches_reference(splits, window):
    """Flash-decoding: the context split over several programs, merged by log-sum-exp, gives the same result
    (a short sequence's later splits, and splits before a window, are empty)."""
    seqs = [(200, 1), (7, 1), (90, 1)]
    tensors, tables, slot_mapping, nd, segments = _case(seqs, 2, 3, 32, 16, torch.float32)
    ref = paged_attention(*[x.clone() for x in tensors],
                          _torch_meta(seqs, tables, slot_mapping, nd, segments, 16, window), 0.2, window)
    q, k, v, k_cache, v_cache = tensors
    k_cache.view(-1, 2, 32)[slot_mapping] = k  # what paged_attention does before attending
    v_cache.view(-1, 2, 32)[slot_mapping] = v
    meta = _triton_meta(seqs, tables, slot_mapping, nd, segments)
    for s in (1, splits):
        out = ta.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, 0.2, 201, window,
                                  num_splits=s)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype,group,window", [
    (torch.float32, 1, None),
    (torch.float32, 3, None),
    (torch.float32, 3, 24),
    (torch.bfloat16, 3, None),
    (torch.float16, 1, 24),
], ids=["fp32-mha", "fp32-gqa3", "fp32-gqa3-window", "bf16-gqa3", "fp16-window"])
def test_prefill_matches_reference(dtype, group, window):
    # no prefix (one chunk longer than a kernel tile), cached prefixes not on block boundaries, a 1-token
    # chunk with no prefix, and a chunk that starts exactly on a block boundary
    seqs = [(0, 40), (21, 9), (0, 1), (32, 35), (5, 2)]
    _compare(seqs, group=group, dtype=dtype, window=window)


def test_prefill_single_chunk_without_prefix():
    _compare([(0, 23)], group=2)


def test_mixed_batch_of_decodes_and_chunks():
    """The engine's layout: decodes first, then chunks; the two kernels share the per-sequence tensors."""
    _compare([(30, 1), (64, 1), (2, 1), (0, 17), (40, 12)], group=3, window=None, seed=1)
    _compare([(30, 1), (64, 1), (2, 1), (0, 17), (40, 12)], group=3, window=10, seed=2)


def test_head_dim_64_and_bf16_window():
    _compare([(100, 1), (0, 33), (17, 8)], hkv=1, group=2, d=64, dtype=torch.bfloat16, window=48)


def test_wrong_answers_are_caught():
    """The comparison has teeth: a kernel run with a different window than the reference's fails it."""
    with pytest.raises(AssertionError, match="max abs error"):
        _compare([(50, 1), (30, 6)], backend_window=8)


def test_head_dim_must_be_a_power_of_two():
    q = torch.zeros(1, 1, 24, device=DEVICE)
    with pytest.raises(AssertionError, match="power-of-two"):
        ta.decode_attention(q, torch.zeros(4, 16, 1, 24, device=DEVICE), torch.zeros(4, 16, 1, 24, device=DEVICE),
                            torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0, 1)


def test_backend_resolution():
    cpu = torch.device("cpu")
    assert resolve_attention_backend("auto", cpu) == ("cpu" if cpu_kernels.load_error() is None else "torch")
    assert resolve_attention_backend("torch", cpu) == "torch"
    assert resolve_attention_backend("triton", cpu) == ("triton" if ta.INTERPRETED else "torch")
    with pytest.raises(ValueError, match="attention_backend"):
        resolve_attention_backend("flash", cpu)


@pytest.mark.skipif(not ta.INTERPRETED, reason="the engine test runs the CPU engine")
@pytest.mark.parametrize("arch,overrides", ENGINE_CASES, ids=ENGINE_CASE_IDS)
async def test_engine_greedy_tokens_match_torch_backend(tmp_path, tokenizer, arch, overrides):
    """The whole engine path with the Triton kernels gives the torch backend's greedy tokens."""
    results = await greedy_tokens_by_backend(tmp_path, tokenizer, arch, overrides, ("torch", "triton"))
    assert results["triton"] == results["torch"]
