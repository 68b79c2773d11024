"""A minimal OpenAI-compatible server around Hugging Face `transformers` `generate`, the baseline for
`fleetserve bench --compare`.

    python benchmarks/hf_server.py [--model default] [--port 8001] [--precision fp32] [--device cpu]

Routes: GET /v1/models, POST /v1/completions (streaming SSE with `stream_options.include_usage`, or one
JSON body), GET /health. One request runs at a time (batch 1, behind a lock): this is what serving with
plain `generate` gives you. Honoured fields: prompt (a string or a list of token ids), max_tokens,
temperature, top_p, seed, min_tokens, ignore_eos (min_new_tokens = max_tokens). The model is loaded
the way `transformers` loads it (a GGUF via `from_pretrained(dir, gguf_file=...)`, dequantised), with
`transformers`' own tokenizer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from fleetserve.models import resolve_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load(spec: str, dtype: torch.dtype, device: str):
    """(model, tokenizer, name) for 'default', a .gguf file or a Hugging Face directory."""
    files = resolve_model(spec, progress=True)
    path = Path(files.path)
    if files.format == "gguf":
        kwargs = {"gguf_file": path.name}
        where = str(path.parent)
    else:
        kwargs, where = {}, str(path)
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs).to(device).eval()
    return model, tokenizer, files.name


class _QueueStreamer(BaseStreamer):
    """Hands each new token id from the generate thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": None}}, status_code=status)


def create_app(model, tokenizer, name: str) -> FastAPI:
    app = FastAPI(title="transformers baseline")
    lock = asyncio.Lock()  # batch 1: one generate at a time
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "transformers"}]}

    def gen_kwargs(body: dict[str, Any], ids: list[int]) -> dict[str, Any]:
        max_tokens = int(body.get("max_tokens") or 16)
        temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
        min_tokens = max_tokens if body.get("ignore_eos") else int(body.get("min_tokens") or 0)
        kw = {"input_ids": torch.tensor([ids], device=device),
              "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device),
              "max_new_tokens": max_tokens, "min_new_tokens": min(min_tokens, max_tokens), "pad_token_id": pad_id,
              "do_sample": temperature > 0}
        if temperature > 0:
            kw["temperature"] = temperature
            kw["top_p"] = float(body.get("top_p") or 1.0)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        return kw

    def run_generate(kw: dict[str, Any], seed: int | None) -> None:
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            model.generate(**kw)

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not JSON")
        prompt = body.get("prompt")
        if isinstance(prompt, str) and prompt:
            ids = tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            return _error(400, "prompt must be a non-empty string or list of token ids", "prompt")
        if body.get("model") not in (None, name):
            return _error(404, f"model {body.get('model')!r} is not served here; this server serves {name!r}", "model")
        kw = gen_kwargs(body, ids)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        kw["streamer"] = _QueueStreamer(loop, queue)
        kw["stopping_criteria"] = StoppingCriteriaList([_Cancelled(cancel)])
        seed = body.get("seed")

        async def tokens():
            """Holds the lock for the whole generation; yields each new token id."""
            async with lock:
                job = loop.run_in_executor(None, run_generate, kw, seed)
                try:
                    while (token := await queue.get()) is not None:
                        yield token
                finally:
                    cancel.set()
                    await job

        def finish(n: int) -> str:
            return "length" if n >= kw["max_new_tokens"] else "stop"

        def usage(n: int) -> dict[str, int]:
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        if not body.get("stream"):
            out = [t async for t in tokens()]
            return {"id": rid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"index": 0, "text": tokenizer.decode(out, skip_special_tokens=True),
                                 "logprobs": None, "finish_reason": finish(len(out))}], "usage": usage(len(out))}

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def sse(choices: list, **extra) -> str:
            return "data: " + json.dumps({"id": rid, "object": "text_completion", "created": created, "model": name,
                                          "choices": choices, **extra}) + "\n\n"

        async def stream():
            out: list[int] = []
            sent = ""
            async for token in tokens():
                out.append(token)
                text = tokenizer.decode(out, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # an unfinished UTF-8 character: wait for the next token
                    continue
                if len(text) > len(sent):
                    yield sse([{"index": 0, "text": text[len(sent):], "logprobs": None, "finish_reason": None}])
                    sent = text
            text = tokenizer.decode(out, skip_special_tokens=True)
            yield sse([{"index": 0, "text": text[len(sent):], "logprobs": None, "finish_reason": finish(len(out))}])
            if include_usage:
                yield sse([], usage=usage(len(out)))
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="'default', a .gguf file or an HF directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--precision", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--served-model-name", default=None, help="[default: the model's name, as fleetserve serve]")
    args = ap.parse_args()
    model, tokenizer, name = load(args.model, DTYPES[args.precision], args.device)
    name = args.served_model_name or name
    print(f"transformers baseline serving {name} at http://{args.host}:{args.port}/v1 "
          f"({args.device}, {args.precision}, batch 1)", flush=True)
    uvicorn.run(create_app(model, tokenizer, name), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
