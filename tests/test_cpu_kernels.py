"""The CPU kernels (engine/native/csrc/cpu_kernels.c via cpu_kernels.py): paged decode attention against the
torch reference path of `paged_attention`, the fused RMSNorm / SiLU-and-mul / RoPE against the torch ops,
the build and its fallback, and whole engines on them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fleetserve.engine.native import cpu_kernels
from fleetserve.engine.native.attention import AttentionMetadata, resolve_attention_backend
from fleetserve.engine.native.rope import apply_rope
from tests.attention_cases import (
    ENGINE_CASE_IDS,
    ENGINE_CASES,
    compare,
    greedy_tokens_by_backend,
)
from tests.reference import gguf_round_trip, write_tiny_checkpoint

pytestmark = pytest.mark.skipif(cpu_kernels.load_error() is not None,
                                reason=f"the CPU kernel does not build here: {cpu_kernels.load_error()}")

# context lengths 2, 16, 17, 45, 130 and one exactly on a block boundary (a cached prefix of 31 + the new token)
DECODES = [(1, 1), (15, 1), (16, 1), (44, 1), (129, 1), (31, 1)]
CPU = torch.device("cpu")


def _cpu_meta(seqs, tables, slot_mapping, nd, segments):
    width = max(len(t) for t in tables[:nd])
    return AttentionMetadata(
        slot_mapping=slot_mapping, num_decode=nd, prefills=segments, backend="cpu",
        decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables[:nd]], dtype=torch.int32),
        decode_context_lens=torch.tensor([c + 1 for c, _ in seqs[:nd]], dtype=torch.int32))


def _compare(seqs, *, dtype=torch.float32, **kw):
    # fp32 math on both sides: only the summation order differs (bf16 adds the rounding of the output)
    return compare(seqs, _cpu_meta, 2e-6 if dtype == torch.float32 else 1e-2, dtype=dtype, **kw)


@pytest.mark.parametrize("dtype,hkv,group,d,window,block_size", [
    (torch.float32, 2, 1, 32, None, 16),
    (torch.float32, 1, 3, 32, None, 16),
    (torch.float32, 3, 3, 64, None, 16),  # the embedded model's shape: 9 query heads on 3 KV heads, dim 64
    (torch.float32, 2, 3, 32, 20, 16),
    (torch.float32, 2, 4, 32, None, 8),
    (torch.float32, 1, 8, 128, 33, 32),
    (torch.bfloat16, 2, 3, 64, None, 16),
    (torch.bfloat16, 1, 2, 32, 9, 16),
], ids=["fp32-mha", "fp32-gqa3", "fp32-smollm2", "fp32-gqa3-window", "fp32-block8", "fp32-d128-window",
        "bf16-gqa3", "bf16-window"])
def test_decode_matches_reference(dtype, hkv, group, d, window, block_size):
    _compare(DECODES, hkv=hkv, group=group, d=d, dtype=dtype, window=window, block_size=block_size)


def test_decodes_and_prefill_chunks_in_one_batch():
    """The engine's layout: decodes first (the kernel), then chunks (SDPA), with and without cached prefixes."""
    seqs = [(30, 1), (64, 1), (2, 1), (0, 17), (40, 12)]
    _compare(seqs, group=3, seed=1)
    _compare(seqs, group=3, window=10, seed=2)


def test_wrong_answers_are_caught():
    """The comparison has teeth: the kernel run with a window the reference does not have fails it."""
    with pytest.raises(AssertionError, match="max abs error"):
        _compare([(50, 1), (30, 6)], backend_window=8)


@pytest.mark.parametrize("rows", [1, 16, 300])
def test_fused_ops_match_torch(rows):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 576, generator=g) * 3, torch.randn(576, generator=g)
    torch.testing.assert_close(cpu_kernels.rms_norm(x, w, 1e-5), F.rms_norm(x, (576,), w, 1e-5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cpu_kernels.rms_norm(x.t().contiguous().t(), w, 1e-5), F.rms_norm(x, (576,), w, 1e-5),
                               atol=1e-5, rtol=1e-5)  # a strided input is made contiguous first
    gate_up = torch.randn(rows, 2 * 96, generator=g) * 8  # large |gate|: exp overflows to inf, silu -> 0 or x
    torch.testing.assert_close(cpu_kernels.silu_mul(gate_up), F.silu(gate_up[:, :96]) * gate_up[:, 96:],
                               atol=1e-5, rtol=1e-5)
    # RoPE in place on the q and k heads of a [T, q + k + v heads, D] tensor; the v heads stay as they were
    qkv = torch.randn(rows, 9 + 3 + 3, 64, generator=g)
    cos, sin = torch.randn(rows, 64, generator=g), torch.randn(rows, 64, generator=g)
    expected = torch.cat([apply_rope(qkv[:, :12], cos, sin), qkv[:, 12:]], dim=1)
    cpu_kernels.rope_(qkv, 12, cos, sin)
    torch.testing.assert_close(qkv, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_lowbit_weights_are_recognised_exactly_and_multiply_as_fp32(qtype):
    """A GGUF dequantisation is kept as int8 + scales and gives the fp32 products; anything else is not."""
    from fleetserve.engine.native.linear import Linear

    w = gguf_round_trip(torch.randn(100, 96, generator=torch.Generator().manual_seed(0)) * 0.05, qtype)
    packed = cpu_kernels.pack_lowbit(w)
    assert packed is not None and packed.q.dtype == torch.int8 and packed.q.shape == (7, 96, 16)  # 100 -> 7 panels
    for rows in (1, 3, 16, 17, 40):  # partial chunks of 16 rows, and more than one chunk
        x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
        torch.testing.assert_close(cpu_kernels.lowbit_linear(x, packed), x @ w.t(), atol=1e-5, rtol=1e-5)
    # a Linear packs it at prepack time and drops its fp32 copy
    layer = Linear(96, 100, bias=True)
    layer.weight.data.copy_(w)
    layer.bias.data.normal_()
    x = torch.randn(5, 96)
    expected = x @ w.t() + layer.bias
    layer.prepack()
    assert layer.lowbit is not None and layer.weight.numel() == 0
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    # not low-bit: random fp32, one changed value, or inputs not in blocks of 32
    assert cpu_kernels.pack_lowbit(torch.randn(64, 64)) is None
    bumped = w.clone()
    bumped[3, 7] = torch.nextafter(bumped[3, 7], torch.tensor(1.0))
    assert cpu_kernels.pack_lowbit(bumped) is None
    assert cpu_kernels.pack_lowbit(w[:, :80]) is None


def test_thread_pool_gives_one_threads_results_with_two_callers_and_after_fork():
    """The kernels share their work (GEMM panels, attention sequences) over their own helper threads; each item
    is computed whole by one thread, so results are bit-identical to a single thread's: with the helpers, with
    two callers at once (the second runs its job alone), and in a forked child (which has no helpers)."""
    import os
    import threading

    lib = cpu_kernels.load()
    g = torch.Generator().manual_seed(0)
    w = gguf_round_trip(torch.randn(300, 576, generator=g) * 0.05)
    packed = cpu_kernels.pack_lowbit(w)
    xs = [torch.randn(rows, 576, generator=g) for rows in (1, 7, 16, 40)]
    kc, vc = torch.randn(40, 16, 3, 64, generator=g), torch.randn(40, 16, 3, 64, generator=g)
    tables = torch.randperm(39, generator=g).add(1).to(torch.int32)[:36].view(12, 3)
    lens = torch.randint(1, 48, (12,), generator=g, dtype=torch.int32)
    q = torch.randn(12, 9, 64, generator=g)

    def run() -> list[torch.Tensor]:
        out = [cpu_kernels.lowbit_linear(x, packed) for x in xs]
        return out + [cpu_kernels.decode_attention(q, kc, vc, tables, lens, 0.125, None)]

    lib.fs_pool_stop()
    try:
        alone = run()
    finally:
        assert lib.fs_pool_start(2, cpu_kernels.spin_us()) == 1
    torch.testing.assert_close(alone[2], xs[2] @ w.t(), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(run(), alone))

    mismatches: list[int] = []

    def caller() -> None:
        for _ in range(100):
            mismatches.extend(i for i, (a, b) in enumerate(zip(run(), alone)) if not torch.equal(a, b))

    threads = [threading.Thread(target=caller) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert mismatches == []

    pid = os.fork()
    if pid == 0:  # the child must not return into pytest
        os._exit(0 if all(torch.equal(a, b) for a, b in zip(run(), alone)) else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    lib.fs_pool_stop()
    lib.fs_pool_start(torch.get_num_threads(), cpu_kernels.spin_us())


def _decode_step_both_ways(model, engine, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of one pure decode step (after a prefill and two decode steps) computed by the one-call
    path (cpu_kernels.DecodeLayers) and by the layer-by-layer path, on the same cache."""
    from fleetserve.engine.native.sequence import Sequence
    from fleetserve.engine.types import SamplingParams

    for i, ids in enumerate(prompts):
        engine.scheduler.add(Sequence(f"s{i}", ids, SamplingParams(max_tokens=16, ignore_eos=True)))
    for _ in range(3):
        for seq, tokens, _ in engine.runner.step(engine.scheduler.schedule()):
            seq.token_ids.extend(tokens)
    batch = engine.scheduler.schedule()
    assert batch.num_tokens == [1] * len(prompts)
    input_ids, positions, meta, *_ = engine.runner._prepare(batch)
    layers = model.decode_layers()
    assert layers is not None
    with torch.inference_mode():
        one_call = model(input_ids, positions, engine.kv_cache.layers, meta)
        model._decode_layers = None  # decided: no one-call path
        try:
            by_layer = model(input_ids, positions, engine.kv_cache.layers, meta)
        finally:
            model._decode_layers = layers
    return one_call, by_layer


def test_one_call_decode_step_is_bit_identical_to_the_layer_path(default_model, tokenizer):
    """The embedded model's decode steps run all 30 layers in one C call; they must give exactly what the
    layer-by-layer path gives (the same kernels in the same order), which the HF oracle tests check."""
    from fleetserve.engine.native.engine import EngineConfig, NativeEngine

    model = default_model[0]
    engine = NativeEngine(model, model.cfg, tokenizer.eos_token_ids, EngineConfig(max_model_len=256,
                          kv_cache_tokens=1024), CPU, torch.float32)
    prompts = [tokenizer.encode(t) for t in ("The capital of France is", "1, 2, 3, 4,", "Once upon a time " * 5)]
    one_call, by_layer = _decode_step_both_ways(model, engine, prompts)
    assert torch.equal(one_call, by_layer)


@pytest.mark.parametrize("arch,overrides", [
    ("llama", dict(num_key_value_heads=2)),
    ("mistral", dict(num_key_value_heads=1, sliding_window=12)),
    ("qwen2", dict(num_key_value_heads=2)),  # q/k/v biases
    ("qwen3", dict(num_key_value_heads=2)),  # q/k norms: not one call
], ids=["llama-gqa2", "mistral-window", "qwen2-bias", "qwen3-qk-norm"])
def test_one_call_decode_step_on_other_architectures(tmp_path, tokenizer, arch, overrides):
    from fleetserve.engine.native.engine import EngineConfig, NativeEngine

    path = write_tiny_checkpoint(tmp_path / arch, arch, tokenizer, lowbit=True, hidden_size=64,
                                 num_attention_heads=2, **overrides)
    engine = NativeEngine.load("hf", path, tokenizer.eos_token_ids, EngineConfig(max_model_len=256, block_size=8,
                               kv_cache_tokens=1024), CPU, torch.float32)
    model = engine.runner.model
    if arch == "qwen3":
        assert model.decode_layers() is None
        return
    prompts = [tokenizer.encode(t) for t in ("The capital of France is", "word " * 20)]
    one_call, by_layer = _decode_step_both_ways(model, engine, prompts)
    assert torch.equal(one_call, by_layer)


def test_the_embedded_model_is_kept_low_bit(default_model):
    from fleetserve.engine.native.linear import Linear

    linears = [m for m in default_model[0].modules() if isinstance(m, Linear)]
    assert len(linears) == 121 and all(m.lowbit is not None for m in linears)  # 30 layers x 4, and the LM head


def test_loading_the_kernels_keeps_subnormal_floats():
    """A library linked with -ffast-math would set flush-to-zero for the whole process when loaded."""
    import subprocess
    import sys

    code = ("import sys; from fleetserve.engine.native import cpu_kernels as k; assert k.load() is not None; "
            "import torch; tiny = sys.float_info.min / 4; "
            "assert tiny > 0 and tiny * 1.5 > 0 and (torch.tensor([tiny], dtype=torch.float64) * 1.5).item() > 0, 'flushed to zero'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_backend_resolution():
    assert resolve_attention_backend("auto", CPU) == "cpu"
    assert resolve_attention_backend("cpu", CPU, torch.bfloat16) == "cpu"
    assert resolve_attention_backend("torch", CPU) == "torch"
    # an FP8 cache or fp16 cache is not read by the kernel: auto falls back quietly, "cpu" says why
    for kv in (torch.float8_e4m3fn, torch.float16):
        assert resolve_attention_backend("auto", CPU, kv) == "torch"
        with pytest.raises(ValueError, match="attention_backend 'cpu' reads an fp32 or bf16 KV cache"):
            resolve_attention_backend("cpu", CPU, kv)
    with pytest.raises(ValueError, match="attention_backend 'cpu' runs on CPUs"):
        resolve_attention_backend("cpu", torch.device("cuda"))


def test_without_a_compiler_auto_falls_back_and_cpu_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    monkeypatch.setattr(cpu_kernels, "_error", None)
    monkeypatch.setenv("CC", "no-such-compiler")
    assert resolve_attention_backend("auto", CPU) == "torch"
    with pytest.raises(ValueError, match="needs its C kernel, which did not build: no C compiler found"):
        resolve_attention_backend("cpu", CPU)
    # a compiler that fails: the error names it, and nothing half-written is left in the cache
    monkeypatch.setattr(cpu_kernels, "_error", None)
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("FLEETSERVE_KERNEL_CACHE", str(tmp_path))
    assert cpu_kernels.load() is None and "failed" in cpu_kernels.load_error()
    assert list(tmp_path.iterdir()) == []


def test_build_is_cached_by_source_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEETSERVE_KERNEL_CACHE", str(tmp_path))
    first = cpu_kernels._build(cpu_kernels._compiler())
    assert first.parent == tmp_path and first.suffix == ".so"
    mtime = first.stat().st_mtime_ns
    assert cpu_kernels._build(cpu_kernels._compiler()) == first and first.stat().st_mtime_ns == mtime
    monkeypatch.setattr(cpu_kernels, "CFLAGS", [*cpu_kernels.CFLAGS, "-DFS_TEST_VARIANT"])
    assert cpu_kernels._build(cpu_kernels._compiler()) != first


@pytest.mark.parametrize("arch,overrides", ENGINE_CASES, ids=ENGINE_CASE_IDS)
async def test_engine_greedy_tokens_match_torch_backend(tmp_path, tokenizer, arch, overrides):
    results = await greedy_tokens_by_backend(tmp_path, tokenizer, arch, overrides, ("torch", "cpu"))
    assert results["cpu"] == results["torch"]

