"""Runs one engine step: flattens the scheduled batch into tensors, runs the model, samples.

Token order in the flat batch: decodes (one token each) first, then prefill chunks.
"""

from __future__ import annotations

import torch

from fleetserve.engine.native.attention import AttentionMetadata, PrefillSegment
from fleetserve.engine.native.block_manager import BlockManager
from fleetserve.engine.native.kv_cache import KVCache
from fleetserve.engine.native.model import LlamaModel
from fleetserve.engine.native.sampler import sample
from fleetserve.engine.native.scheduler import ScheduledBatch
from fleetserve.engine.native.sequence import Sequence


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, block_manager: BlockManager,
                 eos_ids: list[int], device: torch.device):
        self.model, self.kv, self.bm = model, kv_cache, block_manager
        self.eos_ids = eos_ids
        self.device = device
        self.bs = block_manager.block_size

    def _prepare(self, batch: ScheduledBatch):
        pairs = sorted(zip(batch.seqs, batch.num_tokens), key=lambda p: p[1] != 1)  # decodes first
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        decode: list[Sequence] = []
        segments: list[PrefillSegment] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        for seq, n in pairs:
            start = seq.num_computed_tokens
            positions = range(start, start + n)
            ids.extend(seq.token_ids[start : start + n])
            pos.extend(positions)
            table = seq.block_table
            slots.extend(table[p // self.bs] * self.bs + p % self.bs for p in positions)
            if n == 1:
                decode.append(seq)
            else:
                bt = torch.tensor(table, dtype=torch.long, device=self.device) if start else None
                segments.append(PrefillSegment(len(ids) - n, len(ids), start + n, bt))
            if start + n == len(seq.token_ids):  # prompt fully in the cache: a new token is due
                sample_rows.append(len(ids) - 1)
                sample_seqs.append(seq)
        dev = self.device
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
                                 num_decode=len(decode), prefills=segments)
        if decode:
            max_blocks = max(len(s.block_table) for s in decode)
            tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in decode]
            meta.decode_block_tables = torch.tensor(tables, dtype=torch.long, device=dev)
            ctx = torch.tensor([s.num_computed_tokens + 1 for s in decode], device=dev)
            span = torch.arange(max_blocks * self.bs, device=dev)
            mask = span[None, :] < ctx[:, None]
            window = self.model.cfg.sliding_window
            if window:
                mask &= span[None, :] >= (ctx - window)[:, None]
            meta.decode_mask = mask.view(len(decode), 1, 1, -1)
        return (torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(pos, dtype=torch.long, device=dev),
                meta, sample_rows, sample_seqs, pairs)

    @torch.inference_mode()
    def step(self, batch: ScheduledBatch) -> list[tuple[Sequence, int]]:
        """Computes the batch's tokens; returns (sequence, new token) for sequences that produced one."""
        input_ids, positions, meta, rows, sample_seqs, pairs = self._prepare(batch)
        hidden = self.model(input_ids, positions, self.kv.layers, meta)
        for seq, n in pairs:
            seq.num_computed_tokens += n
        if not rows:
            return []
        logits = self.model.compute_logits(hidden[rows])
        tokens = sample(logits, sample_seqs, self.eos_ids)
        return list(zip(sample_seqs, tokens))
