"""Tensor parallelism: the process group and the sharded layers (Megatron layout, one process per device).

Every rank holds a slice of each projection:

- column-parallel (`qkv_proj`, `gate_up_proj`): the output features. Each fused part (q, k, v / gate, up)
  is split on its own, so a rank holds whole query heads, whole KV heads and its slice of the MLP width,
  the parts kept adjacent as in the unsharded layout. With more ranks than KV heads, a KV head is
  replicated on the ranks whose query heads use it.
- row-parallel (`o_proj`, `down_proj`): the input features; the partial products are summed by an
  all-reduce, so every rank ends a layer with the full hidden state.
- the embedding and the LM head: a contiguous slice of the (padded) vocabulary. The embedding looks up
  the ids in its slice (zeros elsewhere) and all-reduces; the LM head computes its slice of the logits and
  all-gathers them.

With one rank all of these are the plain layers (`Linear`, with its oneDNN path), so TP=1 is unchanged.
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fleetserve.engine.native.linear import Linear
from fleetserve.engine.native.model_config import ModelConfig

MAX_TP = 64
IDLE_TIMEOUT = datetime.timedelta(days=365)  # the control group waits for the next step as long as the server idles


class TensorParallelError(ValueError):
    """The model cannot be split over the requested number of ranks (or the group cannot be set up)."""


@dataclass(frozen=True)
class TPGroup:
    """This process's place in the tensor-parallel group. `group` carries the collectives of the forward
    (nccl on CUDA, gloo on CPU); `cpu_group` (gloo) carries rank 0's per-step messages."""

    rank: int = 0
    size: int = 1
    group: Any = None
    cpu_group: Any = None


SINGLE = TPGroup()


# ---- validation ----------------------------------------------------------------------------


def tp_problem(cfg: ModelConfig, tp: int) -> str | None:
    """Why `cfg` cannot be split over `tp` ranks, or None (the planner's rule)."""
    from fleetserve.planner.plan import tp_split_problem

    return tp_split_problem(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, tp)


def valid_tp_sizes(cfg: ModelConfig, limit: int = 8) -> list[int]:
    return [t for t in range(1, limit + 1) if tp_problem(cfg, t) is None]


def check_tp(cfg: ModelConfig, tp: int) -> None:
    if not 1 <= tp <= MAX_TP:
        raise TensorParallelError(f"tensor_parallel_size must be from 1 to {MAX_TP}, got {tp}")
    problem = tp_problem(cfg, tp)
    if problem:
        raise TensorParallelError(
            f"tensor_parallel_size {tp} cannot split this model ({cfg.architecture}, {cfg.num_heads} attention "
            f"heads, {cfg.num_kv_heads} KV heads, MLP width {cfg.intermediate_size}): {problem}; valid sizes up to "
            f"8: {', '.join(map(str, valid_tp_sizes(cfg)))}")


def local_kv_heads(num_kv_heads: int, tp: int) -> int:
    """KV heads a rank holds (1 when heads are replicated over more ranks than there are heads)."""
    return max(1, num_kv_heads // tp)


# ---- process group ---------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_tensor_parallel(rank: int, size: int, init_method: str, device: torch.device,
                         timeout_s: float = 120.0) -> TPGroup:
    """Joins the group (the default torch.distributed group of this process): nccl on CUDA, gloo otherwise,
    plus a gloo group for control messages. `timeout_s` bounds the rendezvous and every collective of
    the forward, so a dead peer fails a step instead of hanging it."""
    if dist.is_initialized():
        raise TensorParallelError("this process already belongs to a torch.distributed group; one tensor-parallel "
                                  "engine per process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=timeout)
    cpu_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return TPGroup(rank, size, dist.group.WORLD, cpu_group)


def destroy_tensor_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    if tp.size > 1:
        dist.all_reduce(x, group=tp.group)
    return x


def _check_shape(name: str, w: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(w.shape) != shape:
        raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(w.shape)} vs model {shape}")


# ---- layers ------------------------------------------------------------------------------------


class ColumnParallelLinear(Linear):
    """Fused projection whose output features are split over the ranks, part by part.

    `parts`: for each fused part (q, k, v or gate, up), its full number of output features and of the
    units that must stay whole on one rank (heads; for the MLP every row is a unit). A rank holds units
    [rank * units // tp, ...) of every part, `max(1, units // tp)` of them (KV heads replicate when tp > units).
    """

    def __init__(self, in_features: int, parts: list[tuple[int, int]], bias: bool, tp: TPGroup = SINGLE):
        shards = []  # (first row in the checkpoint's tensor, rows) per part
        for full, units in parts:
            per_unit = full // units
            shards.append((tp.rank * units // tp.size * per_unit, max(1, units // tp.size) * per_unit))
        super().__init__(in_features, sum(n for _, n in shards), bias=bias)
        self.tp, self.full_sizes, self.shards = tp, [full for full, _ in parts], shards

    @property
    def output_sizes(self) -> list[int]:
        return [n for _, n in self.shards]

    def load_part(self, param: str, idx: int, w: torch.Tensor) -> None:
        """Copies this rank's rows of part `idx` (e.g. k_proj.weight for idx 1 of qkv_proj)."""
        full = (self.full_sizes[idx], *getattr(self, param).shape[1:])
        _check_shape(f"{param} of part {idx}", w, full)
        start, n = self.shards[idx]
        off = sum(self.output_sizes[:idx])
        getattr(self, param).data[off : off + n].copy_(w.narrow(0, start, n))


class RowParallelLinear(Linear):
    """Projection whose input features are split over the ranks; the outputs are summed by an all-reduce."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup = SINGLE):
        super().__init__(in_features // tp.size, out_features, bias=False)
        self.tp, self.full_in = tp, in_features

    def load_shard(self, param: str, w: torch.Tensor) -> None:
        _check_shape(param, w, (self.out_features, self.full_in))
        n = self.in_features
        self.weight.data.copy_(w.narrow(1, self.tp.rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(super().forward(x), self.tp)


def _vocab_shard(vocab: int, tp: TPGroup) -> tuple[int, int]:
    per = -(-vocab // tp.size)  # padded: every rank holds the same number of rows
    return tp.rank * per, per


def _load_vocab_rows(param: torch.Tensor, w: torch.Tensor, vocab: int, start: int, name: str) -> None:
    _check_shape(name, w, (vocab, param.shape[1]))
    rows = w[start : start + param.shape[0]]
    param.data[: rows.shape[0]].copy_(rows)
    param.data[rows.shape[0] :].zero_()


class VocabParallelEmbedding(nn.Embedding):
    """Each rank holds a slice of the vocabulary: ids outside it look up zeros, an all-reduce sums the slices."""

    def __init__(self, vocab_size: int, dim: int, tp: TPGroup = SINGLE):
        start, per = _vocab_shard(vocab_size, tp)
        super().__init__(per, dim)
        self.tp, self.vocab_size, self.start = tp, vocab_size, start

    def load_shard(self, param: str, w: torch.Tensor) -> None:
        _load_vocab_rows(self.weight, w, self.vocab_size, self.start, f"embed_tokens.{param}")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(ids)
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(x.masked_fill_(outside[:, None], 0), self.tp)


class ParallelLMHead(Linear):
    """The LM head over this rank's vocabulary slice (the same slicing as the embedding, so tied weights
    share the shard); `gather` all-gathers the slices into full logits on every rank."""

    def __init__(self, dim: int, vocab_size: int, tp: TPGroup = SINGLE):
        start, per = _vocab_shard(vocab_size, tp)
        super().__init__(dim, per, bias=False)
        self.tp, self.vocab_size, self.start = tp, vocab_size, start

    def load_shard(self, param: str, w: torch.Tensor) -> None:
        _load_vocab_rows(self.weight, w, self.vocab_size, self.start, f"lm_head.{param}")

    def gather(self, local_logits: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return local_logits
        parts = [torch.empty_like(local_logits) for _ in range(self.tp.size)]
        dist.all_gather(parts, local_logits.contiguous(), group=self.tp.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]
