"""The native engine: one loop thread owns the scheduler, KV cache and model; asyncio callers talk
to it only through an inbox queue (adds, aborts) and per-request output queues."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import AsyncIterator

import psutil
import torch

from fleetserve.engine.native.fp8 import kv_storage_dtype
from fleetserve.engine.native.attention import resolve_attention_backend
from fleetserve.engine.native.block_manager import BlockManager
from fleetserve.engine.native.kv_cache import KVCache
from fleetserve.engine.native.loader import load_model
from fleetserve.engine.native.model import LlamaModel
from fleetserve.engine.native.model_config import ModelConfig
from fleetserve.engine.native.runner import ModelRunner
from fleetserve.engine.native.scheduler import Scheduler
from fleetserve.engine.native.sequence import Sequence
from fleetserve.engine.native.speculative import EagleDrafter, EagleHead, ngram_propose
from fleetserve.engine.types import (
    EngineHealth,
    EngineOverloaded,
    EngineState,
    EngineStats,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    RequestRejected,
    SamplingParams,
)

log = logging.getLogger("fleetserve.engine")

CPU_KV_BUDGET_BYTES = 2 << 30  # default KV pool on CPU: 2 GiB or a fifth of free memory, whichever is less


class EngineUnavailable(Exception):
    """The engine is loading, draining or stopped: surfaced as HTTP 503."""


@dataclass
class EngineConfig:
    max_model_len: int | None = None
    max_batch_tokens: int = 2048
    max_running_seqs: int = 64
    kv_cache_tokens: int | None = None
    block_size: int = 16
    max_queue_len: int = 256
    enable_prefix_caching: bool = True
    kv_cache_memory: int | None = None  # bytes; used when kv_cache_tokens is not given
    quantization: str | None = None  # "fp8": FP8 weights with per-channel scales (fp8.py)
    kv_cache_dtype: str | None = None  # None/"auto": the model dtype; "fp8", "fp8_e4m3", "fp8_e5m2"
    tensor_parallel_size: int = 1  # > 1: this process is rank 0, ranks 1.. are worker processes (tp_workers.py)
    # "auto": Triton kernels on CUDA when triton imports, the C decode kernel on a CPU when it builds, plain
    # torch otherwise; "torch"; "cpu"; "triton" (on a CPU only under TRITON_INTERPRET=1, for tests). See
    # attention.resolve_attention_backend.
    attention_backend: str = "auto"
    # speculative decoding of greedy requests (docs/ARCHITECTURE.md "Speculative decoding"):
    # None, "ngram" (prompt lookup, no extra weights) or "eagle" (an EAGLE-1 draft head at speculative_draft_path)
    speculative_method: str | None = None
    num_speculative_tokens: int = 4  # k: drafts verified per sequence and step
    speculative_draft_path: str | Path | None = None
    ngram_max: int = 3  # n-gram lookup tries the last ngram_max .. ngram_min tokens
    ngram_min: int = 1


class NativeEngine:
    def __init__(self, model: LlamaModel, model_cfg: ModelConfig, eos_ids: list[int], cfg: EngineConfig,
                 device: torch.device, dtype: torch.dtype):
        self.model_cfg, self.cfg = model_cfg, cfg
        self.device, self.dtype = device, dtype
        self.kv_dtype = kv_storage_dtype(cfg.kv_cache_dtype, dtype)
        self.max_model_len = min(cfg.max_model_len or model_cfg.max_position_embeddings, model.max_len)
        if cfg.max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be at least 1")
        self.tp_size = model.tp.size
        self._model = model
        self.attention_backend = resolve_attention_backend(cfg.attention_backend, device, self.kv_dtype)
        num_blocks = self._num_kv_blocks()
        self.kv_cache = KVCache(model_cfg, num_blocks, cfg.block_size, self.kv_dtype, device, self.tp_size)
        if self.tp_size > 1:
            model.allocate_kv(num_blocks, cfg.block_size, self.kv_dtype)
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.runner = ModelRunner(model, self.kv_cache, self.block_manager, eos_ids, device, self.attention_backend)
        drafter = self._speculation(model, num_blocks)
        self.scheduler = Scheduler(self.block_manager, cfg.max_batch_tokens, cfg.max_running_seqs, drafter,
                                   cfg.num_speculative_tokens, self.max_model_len)
        self.eos_ids = eos_ids
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._seqs: dict[str, Sequence] = {}
        self._state = EngineState.LOADING
        self._message = ""
        self._thread: threading.Thread | None = None
        self._stop = False
        self._stats = EngineStats(kv_blocks_total=num_blocks)
        log.info("KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB, %s), max_model_len %d, attention %s",
                 num_blocks, cfg.block_size, num_blocks * cfg.block_size,
                 num_blocks * KVCache.bytes_per_block(model_cfg, cfg.block_size, self.kv_dtype, self.tp_size) / 2**20,
                 str(self.kv_dtype).removeprefix("torch."), self.max_model_len, self.attention_backend)
        if self.tp_size > 1:
            log.info("tensor parallel size %d: the KV cache above is per rank (its %d of %d KV heads)", self.tp_size,
                     self.kv_cache.layers[0][0].shape[2], model_cfg.num_kv_heads)

    @classmethod
    def load(cls, fmt: str, path: Path, eos_ids: list[int], cfg: EngineConfig, device: torch.device,
             dtype: torch.dtype, progress: bool = False) -> NativeEngine:
        if cfg.tensor_parallel_size > 1:
            from fleetserve.engine.native.tp_workers import launch

            model, model_cfg = launch(fmt, path, device, dtype, cfg.max_model_len, cfg.tensor_parallel_size,
                                      progress=progress, quantization=cfg.quantization)
            try:
                return cls(model, model_cfg, eos_ids, cfg, model.device, dtype)
            except BaseException:
                model.close()
                raise
        model, model_cfg = load_model(fmt, path, device, dtype, cfg.max_model_len, progress=progress,
                                      quantization=cfg.quantization)
        return cls(model, model_cfg, eos_ids, cfg, device, dtype)

    def _speculation(self, model: LlamaModel, num_blocks: int):
        method, k = self.cfg.speculative_method, self.cfg.num_speculative_tokens
        if method in (None, "none"):
            return None
        if k < 1:
            raise ValueError("num_speculative_tokens must be at least 1")
        if method == "ngram":
            nmax, nmin = self.cfg.ngram_max, self.cfg.ngram_min
            log.info("speculative decoding: n-gram prompt lookup (n %d..%d), %d draft tokens per step, greedy "
                     "requests only", nmax, nmin, k)
            return lambda seq, limit: ngram_propose(seq.token_ids, limit, nmax, nmin)
        if method == "eagle":
            if self.tp_size > 1:
                raise ValueError("speculative_method 'eagle' runs without tensor parallelism (the head uses rank 0's "
                                 "embedding and LM head shards); use ngram with tp_size > 1")
            if not self.cfg.speculative_draft_path:
                raise ValueError("speculative_method 'eagle' needs speculative_draft_path (the EAGLE head's directory)")
            head = EagleHead.load(Path(self.cfg.speculative_draft_path), model, self.device, self.dtype)
            self.runner.eagle = EagleDrafter(head, model, self.block_manager, num_blocks, k, self.max_model_len,
                                             self.device, self.dtype)
            log.info("speculative decoding: EAGLE head %s, %d draft tokens per step, greedy requests only",
                     self.cfg.speculative_draft_path, k)
            return lambda seq, limit: seq.next_drafts[:limit]
        raise ValueError(f"unknown speculative_method {method!r}: expected ngram or eagle")

    def _num_kv_blocks(self) -> int:
        bs = self.cfg.block_size
        per_block = KVCache.bytes_per_block(self.model_cfg, bs, self.kv_dtype, self.tp_size)
        if self.cfg.kv_cache_tokens is not None:
            tokens = self.cfg.kv_cache_tokens
            if tokens < self.max_model_len:
                raise ValueError(f"kv_cache_tokens ({tokens}) must be at least max_model_len "
                                 f"({self.max_model_len}) so one full-length request fits")
        elif self.cfg.kv_cache_memory is not None:
            tokens = self.cfg.kv_cache_memory // per_block * bs
            if tokens < self.max_model_len:
                raise ValueError(f"kv_cache_memory ({self.cfg.kv_cache_memory} bytes) holds {tokens} tokens; "
                                 f"max_model_len ({self.max_model_len}) needs at least {self.max_model_len}")
        else:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * 0.85)
            else:
                budget = min(CPU_KV_BUDGET_BYTES, psutil.virtual_memory().available // 5)
            tokens = max(self.max_model_len, min(budget // per_block * bs,
                                                 self.cfg.max_running_seqs * self.max_model_len))
        return -(-tokens // bs)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the loop thread after one warm-up step (readiness means a step has run)."""
        warm = Sequence("warmup", [self.eos_ids[0] if self.eos_ids else 0], SamplingParams(max_tokens=1, logprobs=1))
        self.scheduler.add(warm)
        self.runner.step(self.scheduler.schedule())
        self.scheduler.finish(warm)
        self._state = EngineState.READY
        self._thread = threading.Thread(target=self._loop, name="fleetserve-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        if self._state == EngineState.READY:
            self._state = EngineState.DRAINING
        if drain:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._streams and (deadline is None or time.monotonic() < deadline):
                await asyncio.sleep(0.05)
        for rid in list(self._streams):
            self.abort(rid)
        await asyncio.to_thread(self.stop)

    def stop(self) -> None:
        """Stops the loop thread now (in-flight requests are abandoned); safe to call twice."""
        self._stop = True
        self._wakeup.set()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(10)
        if self.tp_size > 1:  # the workers stop with the engine
            self._model.close()
        self._state = EngineState.STOPPED
        for rid, (loop, q) in list(self._streams.items()):  # readers left behind get a final event
            self._streams.pop(rid, None)
            if not loop.is_closed():
                loop.call_soon_threadsafe(q.put_nowait, GenerationEvent(
                    rid, [], FinishReason.ABORT, error="the request was aborted by the server (shutting down)"))

    def health(self) -> EngineHealth:
        return EngineHealth(self._state, self._message)

    def stats(self) -> EngineStats:
        s = self._stats
        s.running = len(self.scheduler.running)
        s.waiting = len(self.scheduler.waiting) + self._inbox.qsize()
        s.kv_blocks_used = self.block_manager.num_used
        s.prefix_cache_hit_tokens = self.block_manager.hit_tokens
        s.prefix_cache_queried_tokens = self.block_manager.queried_tokens
        r = self.runner
        s.spec_draft_tokens, s.spec_accepted_tokens = r.spec_draft_tokens, r.spec_accepted_tokens
        s.spec_verifications = r.spec_verifications
        return s

    # ---- requests --------------------------------------------------------------------------

    def validate(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise RequestRejected("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise RequestRejected(f"the prompt has {len(prompt_token_ids)} tokens; this model's context "
                                  f"window is {self.max_model_len} tokens, including the output")
        vocab = self.model_cfg.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestRejected(f"token id {bad} is out of range (vocabulary size {vocab})")

    async def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if self._state != EngineState.READY:
            raise EngineUnavailable(f"the engine is {self._state.value}")
        self.validate(req.prompt_token_ids)
        if req.request_id in self._streams:
            raise RequestRejected(f"duplicate request id {req.request_id!r}")
        if len(self.scheduler.waiting) + self._inbox.qsize() >= self.cfg.max_queue_len:
            raise EngineOverloaded(f"the waiting queue is full ({self.cfg.max_queue_len} requests)")
        return self._stream(req)

    async def _stream(self, req: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        q: asyncio.Queue = asyncio.Queue()
        self._streams[req.request_id] = (asyncio.get_running_loop(), q)
        self._inbox.put(("add", Sequence(req.request_id, req.prompt_token_ids, req.sampling)))
        self._wakeup.set()
        finished = False
        try:
            while True:
                ev: GenerationEvent = await q.get()
                finished = ev.finish_reason is not None
                yield ev
                if finished:
                    return
        finally:
            if not finished:
                self.abort(req.request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wakeup.set()

    # ---- the loop (engine thread only below) -----------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop:
            self._drain_inbox()
            if not self.scheduler.has_work():
                self._wakeup.wait(0.5)
                self._wakeup.clear()
                continue
            batch = self.scheduler.schedule()
            if not batch:
                time.sleep(0.001)
                continue
            prompt_tokens = sum(n for s, n in zip(batch.seqs, batch.num_tokens)
                                if s.num_computed_tokens < s.num_prompt_tokens)
            try:
                results = self.runner.step(batch)
            except Exception as exc:  # a bad step fails its requests, not the server
                log.exception("engine step failed")
                self._fail(batch.seqs, f"engine error: {exc}")
                continue
            self._stats.steps += 1
            self._stats.preemptions += batch.num_preempted
            self._stats.prompt_tokens_computed += prompt_tokens
            self._process(results)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._seqs[item.request_id] = item
                self.scheduler.add(item)
            else:
                seq = self._seqs.pop(item, None)
                if seq is not None:
                    self.scheduler.finish(seq)
                    self._stats.aborts += 1
                stream = self._streams.pop(item, None)
                if stream is not None:  # someone may still be reading: end their stream, never leave it hanging
                    loop, q = stream
                    loop.call_soon_threadsafe(q.put_nowait, GenerationEvent(
                        item, [], FinishReason.ABORT, error="the request was aborted by the server (shutting down)"))

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        sp = seq.sampling
        if seq.num_output_tokens >= sp.min_tokens:
            if token in sp.stop_token_ids or (not sp.ignore_eos and token in self.eos_ids):
                return FinishReason.STOP
        if seq.num_output_tokens >= sp.max_tokens or len(seq) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _process(self, results) -> None:
        out: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, GenerationEvent]]] = {}
        for seq, tokens, logprobs in results:
            reason = None
            if tokens is None:  # prompt-only request (max_tokens 0): done once the prefill is
                reason = FinishReason.LENGTH
            else:  # several tokens after a speculative step: nothing is emitted past a stop or length finish
                for i, token in enumerate(tokens):
                    seq.token_ids.append(token)
                    reason = self._finish_reason(seq, token)
                    if reason is not None:
                        tokens, logprobs = tokens[: i + 1], None if logprobs is None else logprobs[: i + 1]
                        break
                self._stats.generation_tokens += len(tokens)
            stream = self._streams.get(seq.request_id)
            if reason is not None:
                self.scheduler.finish(seq)
                self._seqs.pop(seq.request_id, None)
                self._streams.pop(seq.request_id, None)
            if stream is None:
                continue
            loop, q = stream
            ev = GenerationEvent(seq.request_id, tokens or [], reason,
                                 num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=seq.num_cached_tokens,
                                 logprobs=logprobs)
            if seq.prompt_logprobs is not None and seq.num_emitted == 0:
                ev.prompt_logprobs = seq.prompt_logprobs
            seq.num_emitted += max(1, len(tokens or []))
            out.setdefault(loop, []).append((q, ev))
        for loop, items in out.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _fail(self, seqs: list[Sequence], message: str) -> None:
        for seq in seqs:
            self.scheduler.finish(seq)
            self._seqs.pop(seq.request_id, None)
            stream = self._streams.pop(seq.request_id, None)
            if stream:
                loop, q = stream
                ev = GenerationEvent(seq.request_id, [], FinishReason.ERROR, error=message)
                loop.call_soon_threadsafe(q.put_nowait, ev)


def _deliver(items: list[tuple[asyncio.Queue, GenerationEvent]]) -> None:
    for q, ev in items:
        q.put_nowait(ev)
