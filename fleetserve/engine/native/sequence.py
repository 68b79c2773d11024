"""One request inside the engine: its tokens, its progress through the KV cache, its sampling state."""

from __future__ import annotations

import enum
import itertools
import time

import torch

from fleetserve.engine.types import FinishReason, SamplingParams

_counter = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams):
        self.seq_id = next(_counter)
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling = sampling
        self.status = SeqStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks computed so far
        self.admitted_before = False
        self.finish_reason: FinishReason | None = None
        self.arrival = time.monotonic()
        self.num_emitted = 0  # output tokens already handed to the frontend
        self.prompt_logprobs: list | None = [None] if sampling.prompt_logprobs is not None else None
        self.generator: torch.Generator | None = None
        # speculative decoding: drafts to verify in the scheduled step (set by the scheduler), drafts an
        # EAGLE head proposed after the last step, and positions whose draft-head K/V hold target features
        self.draft_tokens: list[int] = []
        self.next_drafts: list[int] = []
        self.draft_computed = 0
        if sampling.seed is not None:
            self.generator = torch.Generator().manual_seed(sampling.seed)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt positions still lacking a logprob (they are computed with the prefill, chunk by chunk)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def can_speculate(self) -> bool:
        """Greedy requests without grammar masks or penalties: acceptance is an argmax match, so the output is
        the one non-speculative decoding gives. Sampled requests are never speculated (their draws, seeded
        ones included, stay exactly those of plain decoding)."""
        sp = self.sampling
        return sp.greedy and not sp.logits_processors and not sp.needs_penalties

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED
