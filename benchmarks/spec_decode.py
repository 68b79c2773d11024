"""Tokens/s and acceptance with and without n-gram speculative decoding on a repetitive greedy workload
(the embedded model, CPU, fp32). Usage: python benchmarks/spec_decode.py [--k 4] [--concurrency 4]"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from fleetserve.engine.native.engine import EngineConfig, NativeEngine
from fleetserve.engine.native.loader import load_model
from fleetserve.models import default_model_file
from fleetserve.tokenizer import Tokenizer
from tests.reference import engine_generate

TASKS = ["Write the numbers from 1 to 40, separated by commas.",
         "Repeat this sentence four times: the quick brown fox jumps over the lazy dog.",
         "List the days of the week twice, one per line.",
         "Copy this text exactly: alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu."]


async def run(engine, prompts, max_tokens, concurrency):
    t0 = time.perf_counter()
    outs = []
    for i in range(0, len(prompts), concurrency):
        outs += await asyncio.gather(*(engine_generate(engine, p, max_tokens) for p in prompts[i:i + concurrency]))
    return outs, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args()
    torch.set_num_threads(2)
    gguf = default_model_file(progress=False)
    tok = Tokenizer.from_gguf(gguf)
    model, cfg = load_model("gguf", gguf, torch.device("cpu"), torch.float32, 2048)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}]), add_special_tokens=False)
               for t in TASKS]
    results = {}
    for name, extra in (("plain", {}), ("ngram", {"speculative_method": "ngram",
                                                  "num_speculative_tokens": args.k})):
        engine = NativeEngine(model, cfg, tok.eos_token_ids, EngineConfig(max_model_len=2048, **extra),
                              torch.device("cpu"), torch.float32)
        engine.start()
        asyncio.run(run(engine, prompts[:1], 8, 1))  # warm-up
        s0 = engine.stats()
        steps0, d0, a0 = s0.steps, s0.spec_draft_tokens, s0.spec_accepted_tokens
        outs, dt = asyncio.run(run(engine, prompts, args.max_tokens, args.concurrency))
        s = engine.stats()
        n = sum(len(o) for o in outs)
        drafts, acc = s.spec_draft_tokens - d0, s.spec_accepted_tokens - a0
        results[name] = outs
        print(f"{name:6s} tokens {n:4d}  {dt:6.2f} s  {n / dt:6.1f} tok/s  steps {s.steps - steps0:4d}  "
              f"tokens/step {n / (s.steps - steps0):.2f}  drafts {drafts}  accepted {acc}  "
              f"acceptance {acc / drafts if drafts else 0:.2f}")
        engine.stop()
    print("outputs identical:", results["plain"] == results["ngram"])


if __name__ == "__main__":
    main()
