"""The CPU's bf16 mode (loader.activation_dtype): bf16 weights and matmuls, fp32 everything else, a bf16 KV
cache; it stays close to fp32 on the embedded model."""

from __future__ import annotations

import torch

from fleetserve.engine.native.engine import EngineConfig, NativeEngine
from fleetserve.engine.native.linear import Linear
from fleetserve.engine.native.loader import activation_dtype, load_model
from tests.reference import engine_generate

TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
        "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")


def test_activation_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert activation_dtype(cpu, torch.bfloat16) == torch.float32
    assert activation_dtype(cpu, torch.float32) == torch.float32
    assert activation_dtype(cuda, torch.bfloat16) == torch.bfloat16  # GPUs compute in bf16 throughout


async def test_bf16_on_cpu_is_bf16_matmuls_over_fp32_activations(default_gguf, default_model, tokenizer):
    model, _ = load_model("gguf", default_gguf, torch.device("cpu"), torch.bfloat16, 2048)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.matmul_dtype == torch.bfloat16 and m.packed.dtype == torch.bfloat16 for m in linears)
    assert model.embed_tokens.weight.dtype == model.norm.weight.dtype == torch.float32
    # teacher-forced next-token agreement with the fp32 model over a real text
    ids = torch.tensor(tokenizer.encode(TEXT))
    with torch.inference_mode():
        logits = {}
        for name, m in (("fp32", default_model[0]), ("bf16", model)):
            engine_cfg = EngineConfig(max_model_len=256, kv_cache_tokens=512)
            engine = NativeEngine(m, m.cfg, tokenizer.eos_token_ids, engine_cfg, torch.device("cpu"),
                                  torch.bfloat16 if name == "bf16" else torch.float32)
            if name == "bf16":
                assert engine.kv_cache.layers[0][0].dtype == torch.bfloat16
            logits[name] = _prompt_logits(engine, ids)
    agree = (logits["fp32"].argmax(-1) == logits["bf16"].argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree  # measured 96.7% (benchmarks/precision_agreement.py)
    assert not torch.equal(logits["fp32"], logits["bf16"])  # it is not the fp32 model
    # end to end through the engine loop (bf16 KV stores, the decode kernel reading them): the greedy tokens
    # decoded step by step are those the same model gives teacher-forced over its own output in one prefill
    engine = NativeEngine(model, model.cfg, tokenizer.eos_token_ids,  # no prefix cache: the check prefills it all
                          EngineConfig(max_model_len=256, enable_prefix_caching=False), torch.device("cpu"),
                          torch.bfloat16)
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content":
                                                              "What is the capital of France?"}]),
                              add_special_tokens=False)
    engine.start()
    try:
        out = await engine_generate(engine, prompt, 12, min_tokens=12)
    finally:
        await engine.shutdown(drain=False)
    assert len(out) == 12
    with torch.inference_mode():
        forced = _prompt_logits(engine, torch.tensor(prompt + out)).argmax(-1)[len(prompt) - 1 : -1]
    assert (forced == torch.tensor(out)).float().mean().item() >= 0.9, (forced.tolist(), out)


def _prompt_logits(engine: NativeEngine, ids: torch.Tensor) -> torch.Tensor:
    """Logits at every prompt position from one prefill step run by hand."""
    from fleetserve.engine.native.sequence import Sequence
    from fleetserve.engine.types import SamplingParams

    seq = Sequence("p", ids.tolist(), SamplingParams(max_tokens=1))
    engine.scheduler.add(seq)
    batch = engine.scheduler.schedule()
    input_ids, positions, meta, *_ = engine.runner._prepare(batch)
    hidden = engine.runner.model(input_ids, positions, engine.kv_cache.layers, meta)
    engine.scheduler.finish(seq)
    return engine.runner.model.compute_logits(hidden)
