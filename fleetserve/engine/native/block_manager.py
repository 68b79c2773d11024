"""Hands out fixed-size KV blocks to sequences, and shares full blocks between them (prefix caching).

A full block is named by a hash chained over every token before it, so two prompts that start the
same way map to the same blocks. Blocks are ref-counted; a block nobody references keeps its
contents and stays findable until it is reused (least recently freed first).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from fleetserve.engine.native.sequence import Sequence


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU first
        self.ref_count = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash of a full block -> block id
        self.hit_tokens = 0
        self.queried_tokens = 0

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    # ---- prefix cache -------------------------------------------------------------------------

    def _prefix_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        hashes, parent, bs = [], b"", self.block_size
        for i in range(num_blocks):
            parent = seq.block_hashes[i] if i < len(seq.block_hashes) else block_hash(
                parent, seq.token_ids[i * bs : (i + 1) * bs])
            hashes.append(parent)
        return hashes

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of the sequence (always leaving one token to compute)."""
        if not self.enable_prefix_caching or seq.block_table or seq.prompt_logprobs is not None:
            return []
        blocks = []
        for h in self._prefix_hashes(seq, (len(seq) - 1) // self.block_size):
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Names the sequence's newly completed blocks so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        # only verified tokens: computed and in the token list (a speculative step's accepted drafts are appended
        # after it; rejected drafts' K/V lie beyond num_computed_tokens and are never named)
        full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        bs = self.block_size
        while len(seq.block_hashes) < full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            h = block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs])
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.cached and self.hash_of[block] is None:
                self.cached[h] = block
                self.hash_of[block] = h

    # ---- allocation ---------------------------------------------------------------------------

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free

    def can_admit(self, seq: Sequence, prefix: list[int]) -> bool:
        """Room for the whole uncomputed prompt after reusing `prefix` (reviving an idle block uses a free one)."""
        revived = sum(1 for b in prefix if self.ref_count[b] == 0)
        total_blocks = -(-len(seq) // self.block_size)
        return total_blocks - len(prefix) + revived <= self.num_free

    def use_prefix(self, seq: Sequence, prefix: list[int]) -> None:
        for block in prefix:
            if self.ref_count[block] == 0:
                del self.free_blocks[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
        seq.num_computed_tokens = len(prefix) * self.block_size
        seq.block_hashes = self._prefix_hashes(seq, len(prefix))
        if not seq.admitted_before:  # hit rate counts each request's first admission only
            seq.admitted_before = True
            seq.num_cached_tokens = seq.num_computed_tokens
            self.hit_tokens += seq.num_computed_tokens
            self.queried_tokens += seq.num_prompt_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            block, _ = self.free_blocks.popitem(last=False)
            h = self.hash_of[block]
            if h is not None:  # evict: its contents are about to be overwritten
                del self.cached[h]
                self.hash_of[block] = None
            self.ref_count[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):  # tail blocks are the least likely to be shared
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free_blocks[block] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def trim(self, seq: Sequence) -> None:
        """Frees the blocks beyond the computed tokens (reserved for drafts that were rejected). They hold no
        verified token, so they were never named in the prefix cache and nobody else references them."""
        keep = -(-seq.num_computed_tokens // self.block_size)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free_blocks[block] = None

    def reset_prefix_cache(self) -> None:
        for h, block in list(self.cached.items()):
            if self.ref_count[block] == 0:
                del self.cached[h]
                self.hash_of[block] = None

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
