"""The correctness oracle: greedy decoding equals Hugging Face transformers token for token (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from fleetserve.engine.native.engine import EngineConfig, NativeEngine
from fleetserve.tokenizer import Tokenizer
from tests.reference import assert_same_greedy, engine_generate, hf_greedy, write_tiny_checkpoint

RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away, there lived a",
    "1, 2, 3, 4, 5,",
]


def EOS(tokenizer: Tokenizer) -> list[int]:  # noqa: N802
    return tokenizer.eos_token_ids


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colours."}],
]


@pytest.fixture(scope="module")
def hf_default(default_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name,
                                                dtype=torch.float32).eval()


async def test_default_model_raw_prompts_match_hf(default_engine, tokenizer, hf_default):
    for text in RAW_PROMPTS:
        prompt = tokenizer.encode(text)
        ours = await engine_generate(default_engine, prompt, 24, min_tokens=24)
        assert_same_greedy(hf_default, prompt, ours, hf_greedy(hf_default, prompt, 24, EOS(tokenizer)))


async def test_default_model_chat_template_matches_hf(default_engine, tokenizer, hf_default):
    for messages in CHATS:
        prompt = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
        ours = await engine_generate(default_engine, prompt, 20, min_tokens=20)
        assert_same_greedy(hf_default, prompt, ours, hf_greedy(hf_default, prompt, 20, EOS(tokenizer)))


async def test_default_model_answers_paris(default_engine, tokenizer):
    prompt = tokenizer.encode(tokenizer.apply_chat_template(CHATS[0]), add_special_tokens=False)
    out = await engine_generate(default_engine, prompt, 32)
    assert out[-1] in tokenizer.eos_token_ids  # stopped by EOS, not length
    assert tokenizer.decode(out) == "The capital of France is Paris."


TINY = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("qwen2", {}),  # QKV bias
    ("qwen3", {"head_dim": 32}),  # per-head QK norm, head_dim != hidden / heads
    ("mistral", {"sliding_window": 16}),  # prompts longer than the window
]


@pytest.mark.parametrize("arch,overrides", TINY, ids=[f"{a}-{i}" for i, (a, _) in enumerate(TINY)])
async def test_tiny_random_checkpoints_match_hf(tmp_path, tokenizer: Tokenizer, arch, overrides):
    from transformers import AutoModelForCausalLM

    path = write_tiny_checkpoint(tmp_path / arch, arch, tokenizer, **overrides)
    assert (path / "model.safetensors.index.json").exists()  # sharded with an index
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = NativeEngine.load("hf", path, tokenizer.eos_token_ids, EngineConfig(max_model_len=512),
                               torch.device("cpu"), torch.float32)
    engine.start()
    try:
        for text in RAW_PROMPTS[:2] + ["word " * 40]:
            prompt = tokenizer.encode(text)
            ours = await engine_generate(engine, prompt, 16, min_tokens=16)
            assert_same_greedy(ref, prompt, ours, hf_greedy(ref, prompt, 16, EOS(tokenizer)))
        prompt = tokenizer.encode(tokenizer.apply_chat_template(CHATS[1]), add_special_tokens=False)
        ours = await engine_generate(engine, prompt, 16, min_tokens=16)
        assert_same_greedy(ref, prompt, ours, hf_greedy(ref, prompt, 16, EOS(tokenizer)))
    finally:
        await engine.shutdown(drain=False)
