"""The paged KV cache: per layer, K and V tensors of [num_blocks, block_size, kv_heads, head_dim].

With tensor parallelism each rank's cache holds only its own KV heads (same blocks, same slots)."""

from __future__ import annotations

import torch

from fleetserve.engine.native.model_config import ModelConfig
from fleetserve.engine.native.parallel import local_kv_heads


class KVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, tp_size: int = 1):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks, block_size, local_kv_heads(cfg.num_kv_heads, tp_size), cfg.head_dim)
        self.layers = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_layers)
        ]

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, tp_size: int = 1) -> int:
        """Bytes of one block on one rank."""
        heads = local_kv_heads(cfg.num_kv_heads, tp_size)
        return 2 * cfg.num_layers * heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size() * block_size
