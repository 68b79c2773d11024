"""The Engine seam: the only types `server` knows about an engine.

An engine works in token ids. Text (detokenization, stop strings) is the frontend's job, so the
same engine serves chat, completions and the batch API, and a remote engine can slot in later.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol
from collections.abc import AsyncIterator, Callable

import torch

# Called with the sequence's output token ids so far and its logits row [vocab]; edits the row in
# place (e.g. a grammar's allowed-token mask). Stateless from the engine's view: it may be called
# again with the same ids after a preemption.
LogitsProcessor = Callable[[list[int], torch.Tensor], None]


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob plus the top k
    prompt_logprobs: int | None = None  # same, for every prompt position (the first has none)
    logits_processors: list[LogitsProcessor] = field(default_factory=list)

    @property
    def needs_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class TokenLogprob:
    """Log-probability of a token under the model's raw distribution (before sampling controls)."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]] = field(default_factory=list)  # the k most likely (id, logprob)


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop token id
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"  # client went away / frontend stopped it (e.g. stop string)
    ERROR = "error"


@dataclass
class GenerationEvent:
    """New tokens for one request since the last event; `finish_reason` set on the last one."""

    request_id: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first event, when asked for


class EngineState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass
class EngineHealth:
    state: EngineState
    message: str = ""


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    steps: int = 0
    prompt_tokens_computed: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    prefix_cache_hit_tokens: int = 0
    prefix_cache_queried_tokens: int = 0
    aborts: int = 0
    spec_draft_tokens: int = 0  # speculative decoding: draft tokens proposed and verified
    spec_accepted_tokens: int = 0  # drafts the target model agreed with
    spec_verifications: int = 0  # sequence-steps that verified drafts

    @property
    def spec_acceptance_rate(self) -> float:
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hit_tokens / self.prefix_cache_queried_tokens if self.prefix_cache_queried_tokens else 0.0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class EngineOverloaded(Exception):
    """The waiting queue is full: surfaced as HTTP 429 with Retry-After."""


class RequestRejected(ValueError):
    """The request can never be served (e.g. prompt longer than the context window)."""


class Engine(Protocol):
    async def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationEvent]: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def health(self) -> EngineHealth: ...

    async def shutdown(self, drain: bool = True) -> None: ...
