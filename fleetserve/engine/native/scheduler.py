"""Continuous batching: which sequences run in the next step, and how many tokens each computes.

Each step spends at most `max_batch_tokens`: running decodes first (one token each), then prompt
chunks of running or newly admitted sequences. A sequence is admitted only when its blocks fit;
when a running sequence cannot grow, the newest running one is preempted (freed and recomputed later).

With speculative decoding a decoding sequence may compute 1 + k tokens: its last token plus k drafts
(`seq.draft_tokens`), which the runner verifies; their blocks are reserved here like any others.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetserve.engine.native.block_manager import BlockManager
from fleetserve.engine.native.sequence import Sequence, SeqStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens computed this step, per sequence
    num_preempted: int = 0

    def __bool__(self) -> bool:
        return bool(self.seqs)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_tokens: int, max_running_seqs: int,
                 drafter: Callable[[Sequence, int], list[int]] | None = None, num_speculative_tokens: int = 0,
                 max_model_len: int | None = None):
        self.bm = block_manager
        self.drafter = drafter  # (sequence, at most k) -> draft tokens
        self.num_speculative_tokens = num_speculative_tokens
        self.max_model_len = max_model_len
        self.max_batch_tokens = max_batch_tokens
        self.max_running_seqs = max_running_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence wherever it is and free its blocks."""
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        self.bm.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.draft_tokens, seq.next_drafts, seq.draft_computed = [], [], 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_batch_tokens
        # Decodes (and prefills already under way) in arrival order; the newest are preempted first.
        decoding = sorted(self.running, key=lambda s: s.arrival)
        scheduled: list[Sequence] = []
        while decoding and budget > 0:
            seq = decoding.pop(0)
            n = min(seq.num_uncomputed, budget)
            while not self.bm.can_allocate(seq, n):
                victim = (decoding or [seq])[-1]
                if victim in decoding:
                    decoding.remove(victim)
                self._preempt(victim)
                batch.num_preempted += 1
                if victim is seq:
                    break
            else:
                self.bm.allocate(seq, n)
                drafts = self._drafts(seq, budget, len(decoding)) if n == 1 else []
                if drafts:
                    self.bm.allocate(seq, n + len(drafts))
                    n += len(drafts)
                seq.draft_tokens = drafts
                scheduled.append(seq)
                batch.num_tokens.append(n)
                budget -= n
        # Admit waiting sequences while tokens, sequence slots and blocks allow (FCFS: no overtaking).
        while self.waiting and budget > 0 and len(self.running) < self.max_running_seqs:
            seq = self.waiting[0]
            prefix = self.bm.match_prefix(seq)
            # Admit only if the whole prompt will fit: a half-admitted prompt would just be preempted.
            if not self.bm.can_admit(seq, prefix):
                break
            self.waiting.popleft()
            self.bm.use_prefix(seq, prefix)
            n = min(seq.num_uncomputed, budget)
            self.bm.allocate(seq, n)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        batch.seqs = scheduled
        return batch

    def _drafts(self, seq: Sequence, budget: int, reserve: int) -> list[int]:
        """Draft tokens for a decoding sequence: never past max_tokens, the context window, the step's token
        budget (all drafts accepted + the bonus token must still be allowed), nor into the free blocks that the
        `reserve` sequences still to be scheduled may need (drafts never cause a preemption)."""
        if self.drafter is None or seq.num_uncomputed != 1 or not seq.can_speculate:
            return []
        k = min(self.num_speculative_tokens, seq.sampling.max_tokens - seq.num_output_tokens - 1, budget - 1)
        if self.max_model_len is not None:
            k = min(k, self.max_model_len - len(seq))
        if k <= 0:
            return []
        drafts = self.drafter(seq, k)[:k]
        while drafts and self.bm.blocks_needed(seq, 1 + len(drafts)) + reserve > self.bm.num_free:
            drafts = drafts[: len(drafts) // 2]
        return drafts
