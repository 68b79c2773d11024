"""How far a lower precision strays from the fp32 reference: top-1 agreement and mean |Δ logprob|
of the actual next token, teacher-forced over a fixed text, plus greedy-decode agreement.

    python benchmarks/precision_agreement.py [--precision bf16] [--model default]
    python benchmarks/precision_agreement.py --precision bf16 --quantization fp8 --kv-cache-dtype fp8_e4m3
"""

from __future__ import annotations

import argparse
import asyncio

import torch
from rich.console import Console
from rich.table import Table

from fleetserve.engine.native.engine import EngineConfig, NativeEngine
from fleetserve.engine.types import GenerationRequest, SamplingParams
from fleetserve.models import resolve_model
from fleetserve.tokenizer import Tokenizer

TEXT = (
    "The history of the city begins with a small settlement on the river bank. Over the centuries it grew into "
    "a trading hub, connecting the northern forests with the southern plains. Merchants brought salt, iron and "
    "cloth; scholars followed, founding a library that still stands today. In the nineteenth century the "
    "railway arrived, and with it factories, workers and a new kind of city life. Today the city is known for "
    "its universities, its bridges and its long summer evenings by the water. Visitors often ask where to "
    "begin: the old market square is the natural starting point, a short walk from the central station."
)
QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "Write a haiku about rain.",
             "Name three primary colours.", "What is a prime number?", "How do vaccines work?"]


async def prompt_logprobs(engine: NativeEngine, ids: list[int]) -> list:
    stream = await engine.generate(GenerationRequest("pl", ids, SamplingParams(max_tokens=0, prompt_logprobs=1)))
    events = [ev async for ev in stream]
    return events[0].prompt_logprobs[1:]


async def greedy(engine: NativeEngine, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    stream = await engine.generate(GenerationRequest(f"g{len(ids)}", ids, SamplingParams(temperature=0, max_tokens=n)))
    async for ev in stream:
        out += ev.token_ids
    return out


async def main_async(args) -> None:
    files = resolve_model(args.model, progress=False)
    tok = Tokenizer.from_model_files(files)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    engines = {}
    label = args.precision + (f"+{args.quantization}" if args.quantization else "") + (
        f"+kv {args.kv_cache_dtype}" if args.kv_cache_dtype else "")
    for name, dtype, extra in (("fp32", "fp32", {}), (label, args.precision, {
            "quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype})):
        engines[name] = NativeEngine.load(files.format, files.path, tok.eos_token_ids, EngineConfig(
            max_model_len=1024, enable_prefix_caching=False, **extra), torch.device("cpu"), dtypes[dtype])
        engines[name].start()
    ids = tok.encode(TEXT)
    ref = await prompt_logprobs(engines["fp32"], ids)
    low = await prompt_logprobs(engines[label], ids)
    top1 = sum((a.top[0][0] == b.top[0][0]) for a, b in zip(ref, low)) / len(ref)
    dlp = sum(abs(a.logprob - b.logprob) for a, b in zip(ref, low)) / len(ref)
    nll_ref = -sum(a.logprob for a in ref) / len(ref)
    nll_low = -sum(b.logprob for b in low) / len(low)
    same_prefix, total = 0, 0
    for q in QUESTIONS:
        p = tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
        a, b = await greedy(engines["fp32"], p, 32), await greedy(engines[label], p, 32)
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same_prefix += n
        total += len(a)
    for e in engines.values():
        e.stop()
    table = Table(title=f"{label} vs fp32 on {files.name} ({len(ref)} teacher-forced positions)")
    for col in ("metric", "value"):
        table.add_column(col)
    table.add_row("top-1 agreement", f"{top1:.1%}")
    table.add_row("mean |Δ logprob| of the actual token", f"{dlp:.4f} nats")
    table.add_row("perplexity fp32 -> " + label, f"{2.718281828 ** nll_ref:.2f} -> {2.718281828 ** nll_low:.2f}")
    table.add_row("greedy tokens identical before first divergence", f"{same_prefix}/{total}")
    Console().print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--model", default="default")
    ap.add_argument("--quantization", choices=["fp8"], default=None, help="FP8 weights (per-channel scales)")
    ap.add_argument("--kv-cache-dtype", choices=["fp8_e4m3", "fp8_e5m2"], default=None)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
