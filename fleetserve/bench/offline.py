"""``fleetserve bench --offline``: the same workload on the native engine in-process, without HTTP.

Like SGLang's offline throughput benchmark, this measures what the engine itself can do: requests go
straight to ``NativeEngine.generate`` and every record is built from the engine's token events, so the
numbers carry no HTTP, JSON or detokenization cost. The engine is built exactly as ``fleetserve serve``
builds it (``fleetserve.server.app.load_engine``): the same config -> ``EngineConfig`` mapping, device and
precision resolution, and a warm-up step before the first request.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fleetserve.bench.client import BenchSetupError
from fleetserve.bench.datasets import load_tokenizer
from fleetserve.bench.metrics import RequestRecord

if TYPE_CHECKING:
    from fleetserve.bench.datasets import BenchRequest
    from fleetserve.tokenizer import Tokenizer


@dataclass
class OfflineSettings:
    model: str = "default"
    precision: str = "auto"
    device: str = "auto"
    max_batch_tokens: int | None = None
    max_running_seqs: int | None = None
    max_model_len: int | None = None
    kv_cache_tokens: int | None = None
    hf_token: str | None = None


def load_offline_engine(settings: OfflineSettings, progress: bool = True) -> tuple[Any, Tokenizer, dict[str, Any]]:
    """(started NativeEngine, its tokenizer, a description) for ``settings`` -- as `serve` loads a worker."""
    from pydantic import ValidationError

    from fleetserve.config import ServeConfig
    from fleetserve.device import resolve_device, resolve_dtype
    from fleetserve.engine.native.engine import NativeEngine
    from fleetserve.models import ModelResolutionError, resolve_model
    from fleetserve.server.app import engine_config
    fields = {k: v for k, v in {
        "model": settings.model, "precision": settings.precision, "device": settings.device,
        "max_batch_tokens": settings.max_batch_tokens, "max_running_seqs": settings.max_running_seqs,
        "max_model_len": settings.max_model_len, "kv_cache_tokens": settings.kv_cache_tokens,
    }.items() if v is not None}
    try:
        # Offline, the benchmark itself is the queue: the engine must accept every request it is given.
        cfg = ServeConfig(**fields, max_queue_len=1 << 30)
    except ValidationError as exc:
        problems = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        raise BenchSetupError(f"invalid engine settings: {problems}") from None
    try:
        files = resolve_model(cfg.model, hf_token=settings.hf_token, progress=progress)
    except ModelResolutionError as exc:
        raise BenchSetupError(str(exc)) from None
    try:
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.precision, device)
    except ValueError as exc:
        raise BenchSetupError(str(exc)) from None
    tokenizer = load_tokenizer(files)
    engine = NativeEngine.load(files.format, files.path, tokenizer.eos_token_ids, engine_config(cfg), device, dtype,
                               progress=progress)
    engine.start()
    info = {"model": files.name, "path": str(files.path), "device": str(device),
            "precision": str(dtype).removeprefix("torch."), "max_batch_tokens": cfg.max_batch_tokens,
            "max_running_seqs": cfg.max_running_seqs, "max_model_len": engine.max_model_len}
    return engine, tokenizer, info


class EngineClient:
    """Sends workload requests to an in-process engine; same records as the HTTP client."""

    def __init__(self, engine: Any, tokenizer: Tokenizer, endpoint: str = "completions", *,
                 ignore_eos: bool = False, temperature: float | None = 0.0):
        self.engine, self.tokenizer, self.endpoint = engine, tokenizer, endpoint
        self.ignore_eos, self.temperature = ignore_eos, temperature
        self.prompt_len_mismatches = 0

    async def aclose(self) -> None:
        """The engine outlives the client (the runner stops it)."""

    def prompt_ids(self, req: BenchRequest) -> list[int]:
        if self.endpoint == "chat":  # the chat route's own rendering: template, then no extra specials
            text = self.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        if req.prompt_token_ids is not None:
            return list(req.prompt_token_ids)
        return self.tokenizer.encode(req.prompt)

    async def send(self, req: BenchRequest) -> RequestRecord:
        from fleetserve.engine.native.engine import EngineUnavailable
        from fleetserve.engine.types import (
            EngineOverloaded,
            FinishReason,
            GenerationRequest,
            RequestRejected,
            SamplingParams,
        )

        ids = self.prompt_ids(req)
        sampling = SamplingParams(temperature=self.temperature if self.temperature is not None else 1.0,
                                  max_tokens=req.output_len, ignore_eos=self.ignore_eos,
                                  min_tokens=req.output_len if self.ignore_eos else 0)
        rec = RequestRecord(index=req.index, start=time.perf_counter(), end=0.0, prompt_len=len(ids),
                            output_len=req.output_len, usage_reported=True)
        try:
            events = await self.engine.generate(GenerationRequest(f"bench-{uuid.uuid4().hex[:16]}", ids, sampling))
            async for ev in events:
                now = time.perf_counter()
                if ev.finish_reason == FinishReason.ERROR:
                    rec.success, rec.error_type, rec.error = False, "engine_error", ev.error or "engine error"
                    break
                if ev.token_ids:
                    rec.chunk_times.append(now)
                    rec.output_tokens += len(ev.token_ids)
                if ev.num_cached_tokens:
                    rec.cached_tokens = ev.num_cached_tokens
        except EngineOverloaded as exc:
            rec.success, rec.error_type, rec.error = False, "overloaded", str(exc)
        except RequestRejected as exc:
            rec.success, rec.error_type, rec.error = False, "rejected", str(exc)
        except EngineUnavailable as exc:
            rec.success, rec.error_type, rec.error = False, "unavailable", str(exc)
        rec.end = time.perf_counter()
        return rec
