"""Speculative decoding in the native engine: n-gram prompt lookup and an EAGLE-1 head. Greedy outputs must be
exactly those of plain decoding, token for token; drafts only change how many tokens one step emits."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import torch

from fleetserve.engine.native.engine import EngineConfig, NativeEngine
from fleetserve.engine.native.speculative import ngram_propose
from fleetserve.engine.types import GenerationRequest, SamplingParams
from tests.reference import engine_generate, write_tiny_checkpoint
from tests.worker_apps import client, make_app, value

QUESTIONS = [
    "Repeat this list three times, separated by commas: apple, banana, cherry, date, elderberry, fig, grape.",
    "What is the capital of France?",
    "Write the numbers from 1 to 20, one per line.",
    "Explain gravity briefly.",
]


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}]),
                             add_special_tokens=False) for q in QUESTIONS]


@pytest.fixture(scope="module")
def spec_engine(make_engine):
    return make_engine(speculative_method="ngram", num_speculative_tokens=4)


@pytest.fixture(scope="module")
async def plain_outputs(default_engine, prompts) -> list[list[int]]:
    return [await engine_generate(default_engine, p, 48) for p in prompts]


async def events_of(engine, prompt: list[int], **sampling) -> list:
    params = SamplingParams(**{"temperature": 0.0, **sampling})
    stream = await engine.generate(GenerationRequest(uuid.uuid4().hex, prompt, params))
    events = [ev async for ev in stream]
    assert all(ev.error is None for ev in events)
    return events


def test_ngram_propose_finds_the_latest_longest_match():
    assert ngram_propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [7, 8, 1]  # latest 3-gram occurrence
    assert ngram_propose([5, 6, 7, 5, 6], 4) == [7, 5, 6]
    assert ngram_propose([1, 2, 3], 2) == []  # nothing repeats
    assert ngram_propose([1, 4, 2, 4], 2) == [2, 4]  # falls back to the 1-gram
    assert ngram_propose([256, 1, 256], 1) == [1]  # byte patterns must align on tokens
    assert ngram_propose([1 << 8, 1, 0, 0, 1 << 8], 5) == [1, 0, 0, 256]


async def test_ngram_greedy_equals_plain_decoding_with_drafts_accepted(spec_engine, prompts, plain_outputs):
    before = spec_engine.stats()
    drafts0, accepted0, steps0 = before.spec_draft_tokens, before.spec_accepted_tokens, before.steps
    for p, plain in zip(prompts, plain_outputs):
        events = await events_of(spec_engine, p, max_tokens=48)
        assert [t for ev in events for t in ev.token_ids] == plain
    stats = spec_engine.stats()
    assert stats.spec_draft_tokens > drafts0
    assert stats.spec_accepted_tokens > accepted0
    assert stats.steps - steps0 < sum(len(o) for o in plain_outputs)  # several tokens per step somewhere
    assert 0 < stats.spec_acceptance_rate <= 1
    assert spec_engine.block_manager.num_used == 0 and not spec_engine.scheduler.running


async def test_repetitive_prompt_emits_several_tokens_per_event(spec_engine, prompts, plain_outputs):
    events = await events_of(spec_engine, prompts[0], max_tokens=48)
    assert [t for ev in events for t in ev.token_ids] == plain_outputs[0]
    assert max(len(ev.token_ids) for ev in events) > 1


async def test_mixed_batch_equals_solo(spec_engine, default_engine, prompts, plain_outputs):
    sampled = dict(temperature=0.8, top_p=0.9, seed=7)
    solo_sampled = await engine_generate(default_engine, prompts[1], 24, **sampled)
    solo_lp = await events_of(default_engine, prompts[2], max_tokens=32, logprobs=2)
    jobs = [engine_generate(spec_engine, p, 48) for p in prompts]
    jobs += [engine_generate(spec_engine, prompts[1], 24, **sampled),
             events_of(spec_engine, prompts[2], max_tokens=32, logprobs=2)]
    *greedy, got_sampled, got_lp = await asyncio.gather(*jobs)
    assert greedy == plain_outputs
    assert got_sampled == solo_sampled  # sampled requests are not speculated: the seed's draws are unchanged
    assert [t for ev in got_lp for t in ev.token_ids] == [t for ev in solo_lp for t in ev.token_ids]
    lp = [(x.token_id, round(x.logprob, 4), [t for t, _ in x.top]) for ev in got_lp for x in ev.logprobs]
    ref = [(x.token_id, round(x.logprob, 4), [t for t, _ in x.top]) for ev in solo_lp for x in ev.logprobs]
    assert lp == ref
    assert spec_engine.block_manager.num_used == 0


async def test_stop_token_max_tokens_and_min_tokens_inside_accepted_drafts(spec_engine, default_engine, prompts,
                                                                          plain_outputs):
    plain = plain_outputs[2]  # "1, 2, 3, ...": long, and its ", " runs are drafted and accepted
    assert len(plain) > 30
    for m in (5, 12, 19, 26):  # length finishes at several places, some inside accepted draft runs
        events = await events_of(spec_engine, prompts[2], max_tokens=m)
        assert [t for ev in events for t in ev.token_ids] == plain[:m]
        assert events[-1].finish_reason.value == "length"
    firsts = [i for i, tok in enumerate(plain[:40]) if i >= 4 and tok not in plain[:i]]
    for i in firsts[:3]:
        tok = plain[i]
        events = await events_of(spec_engine, prompts[2], max_tokens=48, stop_token_ids=[tok])
        assert [t for ev in events for t in ev.token_ids] == plain[: i + 1], i
        assert events[-1].finish_reason.value == "stop"
    # min_tokens bans EOS for the first rows of a verification only
    for p in prompts[:2]:
        want = await engine_generate(default_engine, p, 40, min_tokens=30, logit_bias={13: 2.0})
        assert await engine_generate(spec_engine, p, 40, min_tokens=30, logit_bias={13: 2.0}) == want
    assert spec_engine.block_manager.num_used == 0


async def test_tight_kv_cache_and_context_window(make_engine, prompts, plain_outputs):
    # 12 blocks of 16 tokens for 4 requests: drafts are dropped or requests preempted, outputs unchanged
    engine = make_engine(speculative_method="ngram", num_speculative_tokens=6, max_model_len=128,
                         kv_cache_tokens=192, block_size=16)
    outs = await asyncio.gather(*(engine_generate(engine, p, 48) for p in prompts))
    for p, out, plain in zip(prompts, outs, plain_outputs):
        n = min(48, 128 - len(p))
        assert out == plain[:n]
    assert engine.block_manager.num_used == 0


def _write_eagle_head(path, target_dir, identity: bool = False) -> None:
    """A randomly initialised EAGLE-1 head for the tiny checkpoint: fc (with bias) + one decoder layer without
    input norm, safetensors + config.json, as yuhuili/EAGLE-LLaMA3-Instruct-8B ships them. `identity`: a head
    whose output is its input feature, so every draft repeats the target's last choice (accepted on repeats)."""
    from safetensors.torch import save_file

    cfg = json.loads((target_dir / "config.json").read_text())
    cfg.update(num_hidden_layers=1, architectures=["LlamaForCausalLM"])
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    tensors = {"fc.weight": r(h, 2 * h), "fc.bias": r(h),
               "layers.0.self_attn.q_proj.weight": r(h, h), "layers.0.self_attn.k_proj.weight": r(kv, h),
               "layers.0.self_attn.v_proj.weight": r(kv, h), "layers.0.self_attn.o_proj.weight": r(h, h),
               "layers.0.mlp.gate_proj.weight": r(inter, h), "layers.0.mlp.up_proj.weight": r(inter, h),
               "layers.0.mlp.down_proj.weight": r(h, inter), "layers.0.post_attention_layernorm.weight": torch.ones(h)}
    if identity:
        tensors = {k: torch.zeros_like(v) if "proj" in k else v for k, v in tensors.items()}
        tensors["fc.weight"] = torch.cat([torch.zeros(h, h), torch.eye(h)], dim=1)
        tensors["fc.bias"] = torch.zeros(h)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))


async def test_eagle_head_on_tiny_checkpoint_equals_greedy(tmp_path, tokenizer):
    target = write_tiny_checkpoint(tmp_path / "tiny", "llama", tokenizer)
    _write_eagle_head(tmp_path / "eagle", target)
    _write_eagle_head(tmp_path / "copy", target, identity=True)
    engines = []
    for extra in ({}, *({"speculative_method": "eagle", "num_speculative_tokens": 3,
                         "speculative_draft_path": str(tmp_path / head)} for head in ("eagle", "copy"))):
        engine = NativeEngine.load("hf", target, tokenizer.eos_token_ids, EngineConfig(max_model_len=256, **extra),
                                   torch.device("cpu"), torch.float32)
        engine.start()
        engines.append(engine)
    plain, eagle, copy = engines
    try:
        texts = ["word " * 30, "The quick brown fox", "1 2 3 4 5 6 7 8"]
        ps = [tokenizer.encode(t) for t in texts]
        want = [await engine_generate(plain, p, 40, min_tokens=40) for p in ps]
        got = await asyncio.gather(*(engine_generate(eagle, p, 40, min_tokens=40) for p in ps))
        assert list(got) == want
        got_solo = [await engine_generate(eagle, p, 40, min_tokens=40) for p in ps]
        assert got_solo == want
        stats = eagle.stats()
        assert stats.spec_draft_tokens > 0 and stats.spec_verifications > 0
        print(f"EAGLE random head: acceptance {stats.spec_acceptance_rate:.2f} "
              f"({stats.spec_accepted_tokens}/{stats.spec_draft_tokens})")
        assert eagle.block_manager.num_used == 0
        # the copying head drafts the target's last choice again: accepted where the tiny model repeats itself
        assert [await engine_generate(copy, p, 40, min_tokens=40) for p in ps] == want
        assert copy.stats().spec_accepted_tokens > 0
    finally:
        for engine in engines:
            await engine.shutdown(drain=False)


async def test_metrics_expose_acceptance(spec_engine, tokenizer):
    app, _ = make_app(spec_engine, tokenizer)
    async with client(app) as c:
        r = await c.post("/v1/completions", json={
            "prompt": "a b c d e f a b c d e f a b c d e f a b c", "max_tokens": 16, "temperature": 0})
        assert r.status_code == 200, r.text
        text = (await c.get("/metrics")).text
    drafts = value(text, "fleetserve_spec_decode_draft_tokens_total")
    accepted = value(text, "fleetserve_spec_decode_accepted_tokens_total")
    assert drafts > 0 and 0 < accepted <= drafts
    assert value(text, "fleetserve_spec_decode_verifications_total") > 0
    assert value(text, "fleetserve_spec_decode_acceptance_rate") == pytest.approx(accepted / drafts)


async def test_stop_string_inside_a_multi_token_event_counts_no_token_after_it(tokenizer):
    from fleetserve.engine.types import FinishReason, GenerationEvent
    from fleetserve.server.generation import _text_deltas, collect_text

    ids = tokenizer.encode("Hello there. General Kenobi", add_special_tokens=False)
    stop_at = next(i for i in range(len(ids)) if "." in tokenizer.decode(ids[: i + 1]))

    async def events():
        yield GenerationEvent("r", ids[:2])
        yield GenerationEvent("r", ids[2:], FinishReason.LENGTH)  # several tokens at once, the stop among them

    out = await collect_text(_text_deltas(events(), tokenizer, [1], ["."]))
    assert out.text == "Hello there" and out.finish_reason == "stop"
    assert out.token_ids == ids[: stop_at + 1]
