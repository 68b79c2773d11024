"""Shared by the attention-kernel tests (Triton and the CPU C kernel): random paged-attention cases, the torch
reference metadata for them, and a whole-engine run per attention backend."""

from __future__ import annotations

import asyncio

import torch

from fleetserve.engine.native.attention import AttentionMetadata, PrefillSegment, paged_attention

NUM_BLOCKS = 48


def case(seqs: list[tuple[int, int]], hkv: int, group: int, d: int, block_size: int, dtype, seed: int = 0,
         device: torch.device = torch.device("cpu")):
    """Random q/k/v for a flat batch of (cached tokens, new tokens) sequences, decodes (new == 1) first, and
    a random cache whose blocks are handed out in shuffled order. Returns (q, k, v, k_cache, v_cache), the
    block tables, the slot mapping, the number of decodes and the prefill segments."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype).to(device)  # noqa: E731
    k_cache, v_cache = rand(NUM_BLOCKS, block_size, hkv, d), rand(NUM_BLOCKS, block_size, hkv, d)
    free = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    tables = []
    for cached, new in seqs:
        nblocks = -(-(cached + new) // block_size)
        tables.append([free.pop() for _ in range(nblocks)])
    t = sum(new for _, new in seqs)
    q, k, v = rand(t, hkv * group, d), rand(t, hkv, d), rand(t, hkv, d)
    slots, segments, row = [], [], 0
    for (cached, new), table in zip(seqs, tables):
        slots += [table[p // block_size] * block_size + p % block_size for p in range(cached, cached + new)]
        if new > 1 or cached == 0:
            bt = torch.tensor(table, device=device) if cached else None
            segments.append(PrefillSegment(row, row + new, cached + new, bt))
        row += new
    nd = len(seqs) - len(segments)
    assert all(new == 1 and cached for cached, new in seqs[:nd]), "decodes first"
    slot_mapping = torch.tensor(slots, device=device)
    return (q, k, v, k_cache, v_cache), tables, slot_mapping, nd, segments


def torch_meta(seqs, tables, slot_mapping, nd, segments, block_size, window, device=torch.device("cpu")):
    """The "torch" backend's metadata (decode mask over padded block tables) for a `case`."""
    meta = AttentionMetadata(slot_mapping=slot_mapping, num_decode=nd, prefills=segments)
    if nd:
        width = max(len(t) for t in tables[:nd])
        meta.decode_block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables[:nd]], device=device)
        ctx = torch.tensor([c + 1 for c, _ in seqs[:nd]], device=device)
        span = torch.arange(width * block_size, device=device)
        mask = span[None, :] < ctx[:, None]
        if window:
            mask &= span[None, :] >= (ctx - window)[:, None]
        meta.decode_mask = mask.view(nd, 1, 1, -1)
    return meta


def compare(seqs, meta_of, tol: float, *, hkv=2, group=1, d=32, block_size=16, dtype=torch.float32, window=None,
            seed=0, device=torch.device("cpu"), backend_window="same"):
    """A backend's `paged_attention` (its metadata from `meta_of(seqs, tables, slot_mapping, nd, segments)`)
    against the torch path in fp32 on the same (rounded) inputs; both write the new K/V first, and the caches
    must end up the same.
    `backend_window` runs the backend with another window than the reference (to show a wrong answer fails)."""
    tensors, tables, slot_mapping, nd, segments = case(seqs, hkv, group, d, block_size, dtype, seed, device)
    scale = d**-0.5
    ref_tensors = [x.float().clone() for x in tensors]
    ref = paged_attention(*ref_tensors, torch_meta(seqs, tables, slot_mapping, nd, segments, block_size, window,
                                                   device), scale, window)
    q, k, v, k_cache, v_cache = (x.clone() for x in tensors)
    out = paged_attention(q, k, v, k_cache, v_cache, meta_of(seqs, tables, slot_mapping, nd, segments), scale,
                          window if backend_window == "same" else backend_window)
    assert out.dtype == dtype and out.shape == q.shape
    # the new K/V are in the cache exactly as the reference wrote them (rounded to the cache dtype)
    assert torch.equal(k_cache, ref_tensors[3].to(dtype)) and torch.equal(v_cache, ref_tensors[4].to(dtype))
    err = (out.float() - ref).abs().max().item()
    assert err <= tol, f"max abs error {err} (tolerance {tol})"
    return out.float(), ref


# tiny checkpoints for whole-engine comparisons: grouped-query attention, and a sliding window
ENGINE_CASES = [("llama", dict(num_key_value_heads=2)), ("mistral", dict(num_key_value_heads=1, sliding_window=12))]
ENGINE_CASE_IDS = ["llama-gqa2", "mistral-window"]


async def greedy_tokens_by_backend(tmp_path, tokenizer, arch, overrides, backends, dtype=torch.float32):
    """Greedy tokens of one tiny engine per attention backend over the same requests: chunked prefill over a
    cached prefix, prefix-cache hits, mixed decode + prefill steps."""
    from fleetserve.engine.native.engine import EngineConfig, NativeEngine
    from tests.reference import engine_generate, write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / arch, arch, tokenizer, hidden_size=64, num_attention_heads=2,
                                 num_hidden_layers=2, **overrides)  # head_dim 32
    prompts = [tokenizer.encode(t) for t in ("The capital of France is", "word " * 30, "1, 2, 3, 4, 5,")]
    prompts.append(prompts[1] + tokenizer.encode(" and then"))  # shares cached blocks with prompts[1]
    results = {}
    for backend in backends:
        cfg = EngineConfig(max_model_len=256, max_batch_tokens=24, block_size=8, kv_cache_tokens=1024,
                           attention_backend=backend)
        engine = NativeEngine.load("hf", path, tokenizer.eos_token_ids, cfg, torch.device("cpu"), dtype)
        assert engine.attention_backend == backend
        engine.start()
        try:
            first = await engine_generate(engine, prompts[1], 6, min_tokens=6)
            batch = await asyncio.gather(*(engine_generate(engine, p, 10, min_tokens=10) for p in prompts))
            results[backend] = [first, *batch]
            assert engine.stats().prefix_cache_hit_tokens > 0
        finally:
            await engine.shutdown(drain=False)
    return results
