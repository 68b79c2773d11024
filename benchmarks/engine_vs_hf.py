"""fleetserve's native engine vs Hugging Face `transformers.generate` on the same model, prompts and lengths.

Both run in this process, one after the other, alternating over rounds so machine noise hits both alike.
Prints output tokens/s for each and the ratio. Usage:

    python benchmarks/engine_vs_hf.py [--batch 16] [--new-tokens 64] [--rounds 2] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time

import fleetserve  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
import torch
from rich.console import Console
from rich.table import Table

from fleetserve.engine.native.engine import EngineConfig, NativeEngine
from fleetserve.engine.types import GenerationRequest, SamplingParams
from fleetserve.models import default_model_file
from fleetserve.tokenizer import Tokenizer

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in one paragraph.", "Write a haiku about the sea.",
    "List three uses of copper.", "Why is the sky blue?", "How do vaccines work?", "Describe a cat to a child.",
    "What is a prime number?", "Give me a recipe for pancakes.", "Summarise the plot of Hamlet.",
    "What causes earthquakes?", "How does a bicycle stay upright?", "Name the planets of the solar system.",
    "What is machine learning?", "Tell me a fun fact about octopuses.", "How do I boil an egg?",
]


def hf_generate(model, ids_batch: list[list[int]], new_tokens: int, pad_id: int) -> float:
    width = max(len(x) for x in ids_batch)
    input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids_batch])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids_batch])
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
    dt = time.perf_counter() - t
    assert out.shape[1] - width == new_tokens
    return dt


def fleetserve_generate(engine: NativeEngine, ids_batch: list[list[int]], new_tokens: int) -> float:
    async def one(i: int, ids: list[int]) -> int:
        n = 0
        stream = await engine.generate(GenerationRequest(f"b{i}-{time.monotonic_ns()}", ids, SamplingParams(
            temperature=0.0, max_tokens=new_tokens, ignore_eos=True)))
        async for ev in stream:
            n += len(ev.token_ids)
        return n

    async def run() -> float:
        t = time.perf_counter()
        counts = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(ids_batch)))
        dt = time.perf_counter() - t
        assert all(c == new_tokens for c in counts)
        return dt

    return asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--hf-precision", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    gguf = default_model_file()
    tok = Tokenizer.from_gguf(gguf)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
               for q in (QUESTIONS * (args.batch // len(QUESTIONS) + 1))[: args.batch]]
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtypes[args.hf_precision])
    # rounds repeat the same prompts: the prefix cache is off so later rounds compute their prompts like HF does
    engine = NativeEngine.load("gguf", gguf, tok.eos_token_ids,
                               EngineConfig(max_model_len=2048, enable_prefix_caching=False),
                               torch.device("cpu"), dtypes[args.precision])
    engine.start()
    results: dict[str, list[float]] = {"hf": [], "fleetserve": [], "hf_b1": [], "fleetserve_b1": []}
    for r in range(args.rounds):
        order = ["hf", "fleetserve"] if r % 2 == 0 else ["fleetserve", "hf"]
        for who in order:
            if who == "hf":
                results["hf"].append(hf_generate(hf, prompts, args.new_tokens, tok.eos_token_id))
                results["hf_b1"].append(hf_generate(hf, prompts[:1], args.new_tokens, tok.eos_token_id))
            else:
                results["fleetserve"].append(fleetserve_generate(engine, prompts, args.new_tokens))
                results["fleetserve_b1"].append(fleetserve_generate(engine, prompts[:1], args.new_tokens))
    asyncio.run(engine.shutdown())

    def tps(key: str, n: int) -> float:
        return n * args.new_tokens / statistics.median(results[key])

    table = Table(title=f"{args.batch} streams x {args.new_tokens} tokens, SmolLM2-135M, "
                        f"fleetserve {args.precision} vs HF {args.hf_precision}, {torch.get_num_threads()} threads, "
                        f"{platform.processor() or platform.machine()}")
    for col in ("case", "HF transformers tok/s", "fleetserve tok/s", "ratio"):
        table.add_column(col, justify="right")
    for label, n, a, b in ((f"batch {args.batch}", args.batch, "hf", "fleetserve"),
                           ("batch 1", 1, "hf_b1", "fleetserve_b1")):
        h, f = tps(a, n), tps(b, n)
        table.add_row(label, f"{h:.1f}", f"{f:.1f}", f"{f / h:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
