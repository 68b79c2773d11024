"""Tensor parallelism on CPU (gloo, 2 processes) against TP=1: the sharded layers, a model forward, the engine.

Ranks rendezvous on a free loopback port; every wait is bounded (process joins, collective timeouts), so a
failure fails the test instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fleetserve.engine.native import tp_workers
from fleetserve.engine.native.attention import AttentionMetadata, PrefillSegment
from fleetserve.engine.native.engine import EngineConfig, NativeEngine
from fleetserve.engine.native.kv_cache import KVCache
from fleetserve.engine.native.loader import load_model
from fleetserve.engine.native.parallel import (
    SINGLE,
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    TensorParallelError,
    VocabParallelEmbedding,
    free_port,
    init_tensor_parallel,
)
from tests.reference import engine_generate, write_tiny_checkpoint

JOIN_TIMEOUT_S = 90
PROMPT = [1, 17, 401, 2049, 33, 7, 9000]
# llama: 4 query / 2 KV heads (split); qwen2: QKV bias, tied embeddings, 1 KV head (replicated on both ranks)
CHECKPOINTS = {"llama": dict(arch="llama"),
               "qwen2": dict(arch="qwen2", num_key_value_heads=1, tie_word_embeddings=True)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp")
    return {name: write_tiny_checkpoint(root / name, tokenizer=tokenizer, **kw) for name, kw in CHECKPOINTS.items()}


@pytest.fixture
def short_tp_timeout(monkeypatch):
    monkeypatch.setattr(tp_workers, "TP_TIMEOUT_S", 60.0)


def _run_ranks(target, *args, size: int = 2) -> None:
    """Runs target(rank, size, init_method, *args) in `size` spawned processes; fails on any error or hang."""
    init = f"tcp://127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, size, init, *args), daemon=True) for r in range(size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    assert [p.exitcode for p in procs] == [0] * size, "a rank failed or hung (its traceback is on stderr)"


# ---- (a) layers: 2 gloo processes vs the unsharded ops ---------------------------------------------


def _layer_checks(tp) -> None:
    import torch.distributed as dist

    rank, size = tp.rank, tp.size
    g = torch.Generator().manual_seed(0)  # the same tensors on every rank

    def gather(t: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(t) for _ in range(size)]
        dist.all_gather(parts, t.contiguous())
        return parts

    # column-parallel, fused q/k/v: 8 query heads, 2 KV heads (split) or 1 (replicated), head_dim 4
    for kv_heads in (2, 1):
        parts = [(32, 8), (4 * kv_heads, kv_heads), (4 * kv_heads, kv_heads)]
        w = [torch.randn(n, 16, generator=g) for n, _ in parts]
        b = [torch.randn(n, generator=g) for n, _ in parts]
        x = torch.randn(5, 16, generator=g)
        layer = ColumnParallelLinear(16, parts, True, tp)
        for i in range(3):
            layer.load_part("weight", i, w[i])
            layer.load_part("bias", i, b[i])
        for prepacked in (False, True):
            if prepacked:
                layer.prepack()
            ranks = [y.split(layer.output_sizes, dim=-1) for y in gather(layer(x))]
            for i in range(3):
                want = F.linear(x, w[i], b[i])
                got = torch.cat([r[i] for r in ranks], dim=-1)
                if kv_heads < size and i > 0:  # replicated: every rank holds the whole head
                    got = ranks[rank][i]
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # column-parallel gate/up (MLP rows) and row-parallel down: the unsharded MLP
    inter = 24
    wg, wu, wd = torch.randn(inter, 16, generator=g), torch.randn(inter, 16, generator=g), torch.randn(16, inter,
                                                                                                     generator=g)
    x = torch.randn(3, 16, generator=g)
    gate_up = ColumnParallelLinear(16, [(inter, inter)] * 2, False, tp)
    gate_up.load_part("weight", 0, wg)
    gate_up.load_part("weight", 1, wu)
    down = RowParallelLinear(inter, 16, tp)
    down.load_shard("weight", wd)
    gate, up = gate_up(x).split(inter // size, dim=-1)
    torch.testing.assert_close(down(F.silu(gate) * up), F.linear(F.silu(x @ wg.T) * (x @ wu.T), wd),
                               rtol=1e-5, atol=1e-5)

    # vocab-parallel embedding and LM head with a vocabulary that does not divide by the ranks (padding)
    vocab, dim = 11, 6
    table = torch.randn(vocab, dim, generator=g)
    ids = torch.tensor([0, 5, 6, 10, 3, 10, 1])
    emb = VocabParallelEmbedding(vocab, dim, tp)
    emb.load_shard("weight", table)
    torch.testing.assert_close(emb(ids), F.embedding(ids, table))
    head = ParallelLMHead(dim, vocab, tp)
    head.load_shard("weight", table)
    h = torch.randn(4, dim, generator=g)
    torch.testing.assert_close(head.gather(head(h)), h @ table.T, rtol=1e-5, atol=1e-5)


def test_single_rank_layers_are_the_plain_ones():
    layer = ColumnParallelLinear(8, [(8, 2), (4, 1), (4, 1)], False, SINGLE)
    assert layer.weight.shape == (16, 8) and layer.output_sizes == [8, 4, 4]
    assert RowParallelLinear(8, 4).weight.shape == (4, 8)
    assert VocabParallelEmbedding(11, 4).weight.shape == (11, 4) and ParallelLMHead(4, 11).weight.shape == (11, 4)


# ---- (b) the model: a forward at TP=2 equals TP=1 --------------------------------------------------


def _forward_logits(model, cfg, tp_size: int) -> torch.Tensor:
    """Logits of a prefill of PROMPT and of one decode step after it, through the paged cache."""
    kv = KVCache(cfg, 4, 16, torch.float32, torch.device("cpu"), tp_size)
    n = len(PROMPT)
    meta = AttentionMetadata(slot_mapping=torch.arange(n), prefills=[PrefillSegment(0, n, n, None)])
    prefill = model.compute_logits(model(torch.tensor(PROMPT), torch.arange(n), kv.layers, meta))
    meta = AttentionMetadata(slot_mapping=torch.tensor([n]), num_decode=1, decode_block_tables=torch.tensor([[0]]),
                             decode_mask=(torch.arange(16) <= n).view(1, 1, 1, -1))
    decode = model.compute_logits(model(torch.tensor([42]), torch.tensor([n]), kv.layers, meta))
    return torch.cat([prefill, decode])


def _ranks(rank: int, size: int, init: str, ckpts: dict[str, str], out: str) -> None:
    """One pair of rank processes for (a) and (b) (process start-up is most of the cost)."""
    torch.set_num_threads(1)
    tp = init_tensor_parallel(rank, size, init, torch.device("cpu"), timeout_s=60)
    _layer_checks(tp)
    for name, ckpt in ckpts.items():
        model, cfg = load_model("hf", Path(ckpt), torch.device("cpu"), torch.float32, 128, tp=tp)
        torch.save(_forward_logits(model, cfg, size), f"{out}.{name}.rank{rank}")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def tp2_run(checkpoints, tmp_path_factory) -> str:
    """Runs the layer checks (asserted inside the ranks) and saves each checkpoint's TP=2 logits."""
    out = str(tmp_path_factory.mktemp("tp2") / "logits")
    _run_ranks(_ranks, {name: str(path) for name, path in checkpoints.items()}, out)
    return out


def test_parallel_layers_equal_unsharded_ops(tp2_run):
    """Column-parallel (fused q/k/v split and replicated, gate/up), row-parallel, vocab-parallel embedding and
    LM head on 2 gloo ranks equal the unsharded ops (asserted in each rank; a failing rank fails tp2_run)."""


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_model_logits_tp2_equal_tp1(checkpoints, tp2_run, name):
    model, cfg = load_model("hf", checkpoints[name], torch.device("cpu"), torch.float32, 128)
    want = _forward_logits(model, cfg, 1)
    for rank in range(2):  # the LM head's all-gather gives every rank the full logits
        got = torch.load(f"{tp2_run}.{name}.rank{rank}")
        assert got.shape == want.shape == (len(PROMPT) + 1, cfg.vocab_size)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- (b) the engine: greedy tokens at TP=2 equal TP=1 ----------------------------------------------


def _greedy(engine: NativeEngine, prompts: list[list[int]], n: int) -> list[list[int]]:
    async def run():
        return await asyncio.gather(*(engine_generate(engine, p, n, ignore_eos=True) for p in prompts))

    return asyncio.run(run())


def test_engine_greedy_tp2_equals_tp1(checkpoints, tokenizer, short_tp_timeout):
    import torch.distributed as dist

    prompts = [PROMPT, [5, 6, 7], PROMPT[:4] + [11] * 20]  # decodes and (chunked) prefills in the same steps
    results = {}
    for tp in (1, 2):
        cfg = EngineConfig(max_model_len=256, kv_cache_tokens=1024, max_batch_tokens=16, tensor_parallel_size=tp)
        engine = NativeEngine.load("hf", checkpoints["llama"], tokenizer.eos_token_ids, cfg, torch.device("cpu"),
                                   torch.float32)
        workers = list(getattr(engine.runner.model, "procs", []))
        try:
            assert len(workers) == tp - 1 and engine.kv_cache.layers[0][0].shape[2] == 2 // tp
            engine.start()
            results[tp] = _greedy(engine, prompts, 12)
        finally:
            engine.stop()
        assert not any(p.is_alive() for p in workers) and not dist.is_initialized()
    assert results[2] == results[1]


# ---- (c) validation and worker lifetime --------------------------------------------------------------


def test_default_model_cannot_split_over_two(default_gguf, tokenizer):
    before = set(mp.active_children())
    with pytest.raises(TensorParallelError, match=r"9 attention heads are not divisible by 2.*valid sizes up to "
                                                  r"8: 1, 3$"):
        NativeEngine.load("gguf", default_gguf, tokenizer.eos_token_ids, EngineConfig(tensor_parallel_size=2),
                          torch.device("cpu"), torch.float32)
    assert set(mp.active_children()) == before  # checked before any process starts


RANK0_SCRIPT = """
import os, sys, torch
from pathlib import Path
from fleetserve.engine.native.engine import EngineConfig, NativeEngine
engine = NativeEngine.load("hf", Path(sys.argv[1]), [0], EngineConfig(max_model_len=128, kv_cache_tokens=256,
                           tensor_parallel_size=2), torch.device("cpu"), torch.float32)
engine.start()
print(engine.runner.model.procs[0].pid, flush=True)
sys.stdin.read()
"""


def test_workers_exit_when_rank0_dies(checkpoints):
    proc = subprocess.Popen([sys.executable, "-c", RANK0_SCRIPT, str(checkpoints["llama"])], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        ready, _, _ = select.select([proc.stdout], [], [], JOIN_TIMEOUT_S)
        line = proc.stdout.readline() if ready else b""
        assert line.strip(), "rank 0 did not start"
        worker = int(line)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 15
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), "the worker outlived rank 0"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
