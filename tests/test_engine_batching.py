"""Continuous batching, chunked prefill, preemption, aborts, backpressure and sampling controls of the
native engine, on the real embedded model. "Faster" is counted in engine steps, never timed."""

from __future__ import annotations

import asyncio
import random

import pytest

from fleetserve.engine.types import EngineOverloaded, GenerationRequest, RequestRejected, SamplingParams
from tests.reference import engine_generate

QUESTIONS = [
    "What is the capital of France?", "Why is the sky blue?", "Write a haiku about rain.", "What is 12 times 7?",
    "Name a famous painter.", "How do bees make honey?", "Describe a sunset.", "What is an atom?",
    "Give me a synonym for happy.", "What is the tallest mountain?", "Explain gravity briefly.",
    "Who wrote Hamlet?", "What do cats eat?", "Tell me about the moon.", "What is Python?", "Say hello in Spanish.",
]


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}]),
                             add_special_tokens=False) for q in QUESTIONS]


@pytest.fixture(scope="module")
async def solo_outputs(default_engine, prompts) -> list[list[int]]:
    return [await engine_generate(default_engine, p, 24) for p in prompts]


async def test_concurrent_requests_equal_their_solo_outputs_in_far_fewer_steps(default_engine, prompts,
                                                                               solo_outputs):
    steps_before = default_engine.stats().steps
    outs = await asyncio.gather(*(engine_generate(default_engine, p, 24) for p in prompts))
    steps = default_engine.stats().steps - steps_before
    assert outs == solo_outputs
    serial_steps = sum(len(o) for o in solo_outputs)  # one step per token when alone (prefill emits the first)
    assert steps <= max(len(o) for o in solo_outputs) + 2  # everyone advanced together
    assert serial_steps / steps >= 4  # "several times faster": counted in forward steps
    assert default_engine.block_manager.num_used == 0


async def test_chunked_prefill_gives_identical_outputs(make_engine, prompts, solo_outputs):
    # every prompt (> 20 tokens) is split over several steps; no prefix cache, so every token is computed
    engine = make_engine(max_batch_tokens=8, enable_prefix_caching=False)
    outs = await asyncio.gather(*(engine_generate(engine, p, 24) for p in prompts[:6]))
    assert outs == solo_outputs[:6]
    assert engine.stats().prompt_tokens_computed >= sum(len(p) for p in prompts[:6])


async def test_preemption_when_kv_runs_out_keeps_every_output(make_engine, prompts, solo_outputs):
    # 10 blocks of 16 tokens: three ~36-token prompts are admitted (3 blocks each); as they grow past 48
    # tokens the cache runs out, so the newest is preempted (freed, recomputed later) - outputs unchanged.
    engine = make_engine(max_model_len=128, kv_cache_tokens=160, block_size=16)
    outs = await asyncio.gather(*(engine_generate(engine, p, 24) for p in prompts[:8]))
    assert outs == solo_outputs[:8]
    assert engine.stats().preemptions > 0
    assert engine.block_manager.num_used == 0


async def test_abort_frees_blocks_immediately(default_engine, prompts):
    stream = await default_engine.generate(GenerationRequest("abort-me", prompts[0], SamplingParams(
        temperature=0, max_tokens=500, ignore_eos=True)))
    got = 0
    async for ev in stream:
        got += len(ev.token_ids)
        if got >= 3:
            break
    await stream.aclose()
    for _ in range(200):
        if default_engine.block_manager.num_used == 0 and not default_engine.scheduler.running:
            break
        await asyncio.sleep(0.02)
    assert default_engine.block_manager.num_used == 0
    assert not default_engine.scheduler.running


async def test_random_submit_abort_cycles_leak_no_blocks(make_engine, prompts):
    engine = make_engine(max_model_len=256, kv_cache_tokens=512)
    rng = random.Random(7)

    async def one(i: int) -> None:
        stream = await engine.generate(GenerationRequest(f"cycle-{i}", rng.choice(prompts), SamplingParams(
            temperature=0.8, seed=i, max_tokens=rng.randint(1, 8))))
        stop_after = rng.randint(0, 6)
        async for n, _ in aenumerate(stream):
            if n >= stop_after:
                break
        await stream.aclose()

    for round_ in range(100):  # a thousand random request/abort cycles
        await asyncio.gather(*(one(round_ * 10 + i) for i in range(10)))
    for _ in range(200):
        if engine.block_manager.num_used == 0 and not engine.scheduler.has_work():
            break
        await asyncio.sleep(0.02)
    assert engine.block_manager.num_used == 0
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


async def aenumerate(it):
    i = 0
    async for x in it:
        yield i, x
        i += 1


async def test_full_waiting_queue_is_backpressure(make_engine, prompts):
    engine = make_engine(max_queue_len=0)
    with pytest.raises(EngineOverloaded):
        await engine.generate(GenerationRequest("q", prompts[0], SamplingParams()))


async def test_prompt_longer_than_context_is_rejected(default_engine):
    with pytest.raises(RequestRejected, match="context window"):
        await default_engine.generate(GenerationRequest("long", [1] * 2048, SamplingParams()))
    with pytest.raises(RequestRejected, match="out of range"):
        await default_engine.generate(GenerationRequest("oov", [1, 10**9], SamplingParams()))


async def test_length_limits_and_stop_tokens(default_engine, prompts, solo_outputs, tokenizer):
    assert len(await engine_generate(default_engine, prompts[0], 5, ignore_eos=True)) == 5
    full = await engine_generate(default_engine, prompts[0], 40, ignore_eos=True)
    assert len(full) == 40 and full[:len(solo_outputs[0])] == solo_outputs[0]
    # min_tokens suppresses EOS: the answer continues past where it would have ended
    eos_at = solo_outputs[0].index(tokenizer.eos_token_id)
    longer = await engine_generate(default_engine, prompts[0], 40, min_tokens=eos_at + 3)
    assert len(longer) > eos_at + 1 and tokenizer.eos_token_id not in longer[: eos_at + 3]
    # a stop token id ends generation and is the last token
    stop_id = solo_outputs[0][2]
    out = await engine_generate(default_engine, prompts[0], 40, stop_token_ids=[stop_id])
    assert out == solo_outputs[0][:3]


async def test_seeded_sampling_is_reproducible_in_any_batch(default_engine, prompts):
    params = dict(temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    alone = await engine_generate(default_engine, prompts[3], 20, ignore_eos=True, **params)
    crowd = await asyncio.gather(
        engine_generate(default_engine, prompts[3], 20, ignore_eos=True, **params),
        *(engine_generate(default_engine, p, 20, temperature=1.0, ignore_eos=True) for p in prompts[:6]),
    )
    assert crowd[0] == alone
    other = await engine_generate(default_engine, prompts[3], 20, ignore_eos=True, **{**params, "seed": 99})
    assert other != alone
    # top_k=1 is greedy whatever the temperature
    greedy = await engine_generate(default_engine, prompts[3], 20, ignore_eos=True)
    assert await engine_generate(default_engine, prompts[3], 20, ignore_eos=True, temperature=1.5, top_k=1) == greedy


async def test_prefix_cache_reuses_shared_prompt_prefix(make_engine, tokenizer):
    """A long shared system prompt is computed once; outputs equal those of an engine without the cache."""
    system = "You are a meticulous assistant. " * 12
    chats = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                              {"role": "user", "content": q}]),
                              add_special_tokens=False) for q in QUESTIONS[:6]]
    cached, plain = make_engine(), make_engine(enable_prefix_caching=False)
    want = [await engine_generate(plain, p, 12) for p in chats]
    before = cached.stats().prompt_tokens_computed
    got = [await engine_generate(cached, p, 12) for p in chats]
    computed = cached.stats().prompt_tokens_computed - before
    assert got == want
    shared = len(tokenizer.encode(tokenizer.apply_chat_template([{"role": "system", "content": system}]),
                                  add_special_tokens=False))
    # every request after the first skips the shared blocks
    assert computed <= sum(len(p) for p in chats) - 5 * (shared // 16) * 16
    stats = cached.stats()
    assert stats.prefix_cache_hit_tokens >= 5 * (shared // 16) * 16
    assert 0 < stats.prefix_cache_hit_rate < 1
    assert cached.block_manager.num_used == 0


def test_kv_cache_sized_from_a_memory_budget(make_engine, default_model):
    from fleetserve.config import parse_size

    assert parse_size("2GiB") == 2 << 30 and parse_size("1.5GB") == 1_500_000_000 and parse_size("4096") == 4096
    _, cfg = default_model
    per_token = cfg.kv_bytes_per_token(4)  # fp32
    engine = make_engine(kv_cache_memory=128 << 20)
    assert engine.block_manager.num_blocks == (128 << 20) // (per_token * 16)
    with pytest.raises(ValueError, match="max_model_len"):
        make_engine(kv_cache_memory=per_token * 100)
