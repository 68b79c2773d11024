"""The Hugging Face reference side of the correctness oracle, and tiny random checkpoints to test on."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fleetserve.tokenizer import Tokenizer

TIE_MARGIN = 1e-3  # DESIGN.md: a divergence is acceptable only where the reference's top-2 margin is below this


def hf_greedy(model, prompt: list[int], new_tokens: int, eos_ids: list[int]) -> list[int]:
    """Exactly `new_tokens` greedy tokens; EOS is suppressed (min_new_tokens), as min_tokens does for us."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, eos_token_id=eos_ids)
    return out[0, len(prompt):].tolist()


def top2_margin(model, ids: list[int]) -> float:
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def assert_same_greedy(model, prompt: list[int], ours: list[int], ref: list[int]) -> None:
    """Token-for-token equality, except after a position where the reference itself is a near-tie."""
    assert len(ours) == len(ref), (len(ours), len(ref))
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            margin = top2_margin(model, prompt + ref[:i])
            assert margin < TIE_MARGIN, (
                f"diverged at output position {i}: ours {a} vs reference {b} with reference top-2 margin "
                f"{margin:.2e} (>= {TIE_MARGIN}); ours={ours} ref={ref}")
            return


def gguf_round_trip(w: torch.Tensor, qtype: str = "Q8_0") -> torch.Tensor:
    """`w` quantised to a GGUF type and back: an fp32 tensor that is exactly low-bit, as a GGUF model's are."""
    import gguf

    kind = getattr(gguf.GGMLQuantizationType, qtype)
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), kind), kind).astype("float32"))


def write_tiny_checkpoint(path: Path, arch: str, tokenizer: Tokenizer, lowbit: bool = False, **overrides) -> Path:
    """A randomly initialised model of the given architecture, saved as sharded safetensors with a tokenizer.
    `lowbit`: the decoder's projection weights are GGUF Q8_0 round trips (exactly low-bit, as in a GGUF model),
    so the engine keeps them compact (cpu_kernels.pack_lowbit), and their biases (if any) are random."""
    import transformers

    common = dict(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.3, tie_word_embeddings=False, rms_norm_eps=1e-6,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    common.update(overrides)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**common)).eval()
    if lowbit:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("proj.weight"):
                    p.copy_(gguf_round_trip(p))
                elif name.endswith("proj.bias"):  # initialised to zero: give them values that count
                    p.normal_(0, 0.3)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, max_shard_size="4MB", safe_serialization=True)
    tokenizer.backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
        "chat_template": tokenizer.chat_template, "add_bos_token": False,
    }))
    return path


async def engine_generate(engine, prompt: list[int], max_tokens: int, request_id: str | None = None,
                          **sampling) -> list[int]:
    """All tokens the engine produces for one request (greedy unless sampling says otherwise)."""
    import uuid

    from fleetserve.engine.types import GenerationRequest, SamplingParams

    params = SamplingParams(**{"temperature": 0.0, "max_tokens": max_tokens, **sampling})
    tokens: list[int] = []
    stream = await engine.generate(GenerationRequest(request_id or uuid.uuid4().hex, prompt, params))
    async for ev in stream:
        assert ev.error is None, ev.error
        tokens += ev.token_ids
    return tokens
