"""Runs one engine step: flattens the scheduled batch into tensors, runs the model, samples.

Token order in the flat batch: decodes (one token each) first, then prefill chunks. A speculating
sequence is a chunk with cached context: its last token plus its drafts, all 1 + k rows get logits and
`verify_greedy` keeps the drafts the target agrees with plus one bonus token; the rest is rolled back.
"""

from __future__ import annotations

import torch

from fleetserve.engine.native.attention import AttentionMetadata, PrefillSegment
from fleetserve.engine.native.block_manager import BlockManager
from fleetserve.engine.native.kv_cache import KVCache
from fleetserve.engine.native.model import LlamaModel
from fleetserve.engine.native.sampler import sample, token_logprobs, verify_greedy
from fleetserve.engine.native.scheduler import ScheduledBatch
from fleetserve.engine.native.sequence import Sequence


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, block_manager: BlockManager,
                 eos_ids: list[int], device: torch.device, attention_backend: str = "torch"):
        self.model, self.kv, self.bm = model, kv_cache, block_manager
        self.eos_ids = eos_ids
        self.device = device
        self.bs = block_manager.block_size
        self.backend = attention_backend  # resolved: "torch" | "cpu" | "triton" (see resolve_attention_backend)
        self.eagle = None  # an EagleDrafter when the engine drafts with an EAGLE head
        self.spec_draft_tokens = self.spec_accepted_tokens = self.spec_verifications = 0

    def _prepare(self, batch: ScheduledBatch):
        pairs = sorted(zip(batch.seqs, batch.num_tokens), key=lambda p: p[1] != 1)  # decodes first
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        decode: list[Sequence] = []
        segments: list[PrefillSegment] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_lp: list[tuple[Sequence, int, int]] = []  # (seq, first row, first position) of a chunk
        spec: list[tuple[Sequence, int]] = []  # (seq, first row) of a sequence verifying drafts
        for seq, n in pairs:
            start = seq.num_computed_tokens
            positions = range(start, start + n)
            ids.extend(seq.token_ids[start : start + n] + seq.draft_tokens)
            pos.extend(positions)
            table = seq.block_table
            slots.extend(table[p // self.bs] * self.bs + p % self.bs for p in positions)
            if n == 1:
                decode.append(seq)
            else:
                bt = torch.tensor(table, dtype=torch.long, device=self.device) if start and self.backend != "triton" else None
                segments.append(PrefillSegment(len(ids) - n, len(ids), start + n, bt))
            if seq.wants_prompt_logprobs:
                prompt_lp.append((seq, len(ids) - n, start))
            if seq.draft_tokens:
                spec.append((seq, len(ids) - n))
            elif start + n == len(seq.token_ids) and seq.num_output_tokens < seq.sampling.max_tokens:
                sample_rows.append(len(ids) - 1)  # prompt fully in the cache: a new token is due
                sample_seqs.append(seq)
        dev = self.device
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
                                 num_decode=len(decode), prefills=segments, backend=self.backend)
        if self.backend == "triton":
            self._triton_metadata(meta, pairs)
        elif decode:
            max_blocks = max(len(s.block_table) for s in decode)
            tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in decode]
            ctx = [s.num_computed_tokens + 1 for s in decode]
            if self.backend == "cpu":  # the C kernel: int32 tables and lengths, no mask
                meta.decode_block_tables = torch.tensor(tables, dtype=torch.int32)
                meta.decode_context_lens = torch.tensor(ctx, dtype=torch.int32)
            else:
                meta.decode_block_tables = torch.tensor(tables, dtype=torch.long, device=dev)
                meta.decode_mask = self._decode_mask(torch.tensor(ctx, device=dev), max_blocks)
        return (torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(pos, dtype=torch.long, device=dev),
                meta, sample_rows, sample_seqs, pairs, prompt_lp, spec)

    def _decode_mask(self, ctx: torch.Tensor, max_blocks: int) -> torch.Tensor:
        span = torch.arange(max_blocks * self.bs, device=ctx.device)
        mask = span[None, :] < ctx[:, None]
        window = self.model.cfg.sliding_window
        if window:
            mask &= span[None, :] >= (ctx - window)[:, None]
        return mask.view(len(ctx), 1, 1, -1)

    def _triton_metadata(self, meta: AttentionMetadata, pairs) -> None:
        """One row per sequence (decodes first, as in the batch): block table, context length, query rows."""
        max_blocks = max(len(s.block_table) for s, _ in pairs)
        tables: list[int] = []
        ctx: list[int] = []
        starts = [0]
        for seq, n in pairs:
            tables.extend(seq.block_table)
            tables.extend([0] * (max_blocks - len(seq.block_table)))
            ctx.append(seq.num_computed_tokens + n)
            starts.append(starts[-1] + n)
        dev = self.device
        meta.block_tables = torch.tensor(tables, dtype=torch.int32, device=dev).view(len(pairs), max_blocks)
        meta.context_lens = torch.tensor(ctx, dtype=torch.int32, device=dev)
        meta.query_start = torch.tensor(starts, dtype=torch.int32, device=dev)
        nd = meta.num_decode
        meta.max_decode_context = max(ctx[:nd], default=0)
        meta.max_query_len = max((b - a for a, b in zip(starts[nd:], starts[nd + 1 :])), default=0)

    def _prompt_logprobs(self, hidden: torch.Tensor, chunks: list[tuple[Sequence, int, int]], pairs) -> None:
        """Logprob of each prompt token given the ones before it, for the positions this step computed."""
        n_of = {id(s): n for s, n in pairs}
        for seq, row0, pos0 in chunks:
            # row for position p predicts token p + 1; only prompt tokens are scored
            last = min(pos0 + n_of[id(seq)], seq.num_prompt_tokens - 1)
            if last <= pos0:
                continue
            logits = self.model.compute_logits(hidden[row0 : row0 + last - pos0])
            targets = seq.token_ids[pos0 + 1 : last + 1]
            k = seq.sampling.prompt_logprobs
            seq.prompt_logprobs.extend(token_logprobs(logits, targets, [k] * len(targets)))

    @torch.inference_mode()
    def step(self, batch: ScheduledBatch) -> list[tuple[Sequence, list[int] | None, list | None]]:
        """Computes the batch's tokens. Returns (sequence, new tokens, their logprobs or None) for sequences
        that produced tokens (one, or several after a speculative verification), and (sequence, None, None)
        for finished prompts that asked for no new tokens."""
        input_ids, positions, meta, rows, sample_seqs, pairs, prompt_lp, spec = self._prepare(batch)
        hidden = self.model(input_ids, positions, self.kv.layers, meta)
        if prompt_lp:
            self._prompt_logprobs(hidden, prompt_lp, pairs)
        starts = [seq.num_computed_tokens for seq, _ in pairs] if self.eagle is not None else None
        out: list[tuple[Sequence, list[int] | None, list | None]] = []
        for seq, n in pairs:
            if seq.draft_tokens:
                continue  # advanced by what verification accepts
            seq.num_computed_tokens += n
            self.bm.commit_full_blocks(seq)
            if seq.sampling.max_tokens == 0 and seq.num_computed_tokens == len(seq.token_ids):
                out.append((seq, None, None))
        if rows:
            tokens, lps = sample(self.model.compute_logits(hidden[rows]), sample_seqs, self.eos_ids)
            out.extend((s, [t], None if lp is None else [lp]) for s, t, lp in zip(sample_seqs, tokens, lps))
        if spec:
            self._verify(hidden, spec, out)
        if self.eagle is not None:
            self.eagle.after_step(hidden, pairs, starts, out)
        return out

    def _verify(self, hidden: torch.Tensor, spec: list[tuple[Sequence, int]], out: list) -> None:
        """Accepts each speculating sequence's longest agreeing draft prefix (+ a bonus token) and rolls the rest
        back: num_computed_tokens covers only verified tokens, surplus blocks go back to the pool."""
        rows = [r for seq, row0 in spec for r in range(row0, row0 + 1 + len(seq.draft_tokens))]
        logits = self.model.compute_logits(hidden[rows])
        off = 0
        for seq, _ in spec:
            drafts = seq.draft_tokens
            tokens, lps = verify_greedy(logits[off : off + 1 + len(drafts)], seq, drafts, self.eos_ids)
            off += 1 + len(drafts)
            accepted = len(tokens) - 1
            self.spec_verifications += 1
            self.spec_draft_tokens += len(drafts)
            self.spec_accepted_tokens += accepted
            seq.num_computed_tokens += 1 + accepted
            seq.draft_tokens = []
            self.bm.commit_full_blocks(seq)
            self.bm.trim(seq)
            out.append((seq, tokens, lps))
