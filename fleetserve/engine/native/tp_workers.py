"""Tensor-parallel worker processes and rank 0's handle on them.

Rank 0 is the NativeEngine's own process (scheduler, block manager, sampler, API stay single there);
ranks 1..N-1 are spawned processes that load their shard and then follow rank 0 message by message:

    ("kv", num_blocks, block_size)     allocate this rank's KV cache (its KV heads, the same blocks)
    ("forward", ids, positions, meta)  run the same forward (its collectives pair with rank 0's)
    ("logits", rows)                   receive `rows` hidden states by broadcast, compute the LM head
                                       slice, all-gather (rank 0 keeps the full logits and samples)
    ("stop",)                          leave the group and exit

Messages go over a gloo group with `broadcast_object_list` (the step's inputs are small); the forward's
own all-reduces go over the main group (nccl on CUDA). A worker exits when rank 0 says stop, when a
collective fails (the group broke), or when its parent process is gone (a watchdog thread).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fleetserve.engine.native.kv_cache import KVCache
from fleetserve.engine.native.loader import load_model
from fleetserve.engine.native.model import LlamaModel
from fleetserve.engine.native.model_config import ModelConfig
from fleetserve.engine.native.parallel import (
    TPGroup,
    check_tp,
    destroy_tensor_parallel,
    free_port,
    init_tensor_parallel,
)
from fleetserve.engine.native.weights import load_model_config_and_weights

log = logging.getLogger("fleetserve.engine")

TP_TIMEOUT_S = 300.0  # rendezvous and per-collective limit (loading a large shard happens before the first one)


def _to_device(obj, device: torch.device):
    """The step's inputs (tensors, lists, dataclasses such as AttentionMetadata) moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = copy.copy(obj)
        for f in dataclasses.fields(obj):
            setattr(out, f.name, _to_device(getattr(obj, f.name), device))
        return out
    return obj


def _rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


class TensorParallelModel:
    """Rank 0's model: its own shard plus the workers it drives. Used by the runner like a LlamaModel
    (`model(...)`, `compute_logits(...)`, attributes); each call first tells the workers to do the same."""

    def __init__(self, model: LlamaModel, procs: list, device: torch.device):
        self.model, self.procs, self.device = model, procs, device
        self.tp: TPGroup = model.tp
        self._closed = False

    def __getattr__(self, name: str):  # cfg, max_len, tp, prepack ... of the local shard
        return getattr(self.model, name)

    def _send(self, *msg) -> None:
        dead = [p.name for p in self.procs if not p.is_alive()]
        if dead:
            raise RuntimeError(f"tensor-parallel worker(s) {', '.join(dead)} exited; restart the server")
        dist.broadcast_object_list([msg], src=0, group=self.tp.cpu_group)

    def allocate_kv(self, num_blocks: int, block_size: int, kv_dtype: torch.dtype) -> None:
        self._send("kv", num_blocks, block_size, kv_dtype)

    def __call__(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        cpu = torch.device("cpu")
        self._send("forward", *_to_device((input_ids, positions, meta), cpu))
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self._send("logits", hidden.shape[0])
        hidden = hidden.contiguous()
        dist.broadcast(hidden, src=0, group=self.tp.group)
        return self.model.compute_logits(hidden)

    def close(self, timeout: float = 10.0) -> None:
        """Stops the workers (asked first, then terminated) and leaves the group; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self._send("stop")
        except Exception:  # noqa: BLE001 (a broken group: the workers are stopped below anyway)
            pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(2)
            if p.is_alive():
                p.kill()
                p.join(2)
        destroy_tensor_parallel()


def launch(fmt: str, path: Path, device: torch.device, dtype: torch.dtype, max_len: int | None, tp_size: int,
           progress: bool = False, timeout_s: float | None = None, quantization: str | None = None,
           ) -> tuple[TensorParallelModel, ModelConfig]:
    """Starts ranks 1..tp_size-1, joins the group as rank 0 and loads rank 0's shard. The model is checked
    against tp_size before any process starts (TensorParallelError with the valid sizes)."""
    cfg, _ = load_model_config_and_weights(fmt, path)
    check_tp(cfg, tp_size)
    if device.type == "cuda" and torch.cuda.device_count() < tp_size:
        raise ValueError(f"tensor_parallel_size {tp_size} needs {tp_size} GPUs; {torch.cuda.device_count()} visible")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"tensor parallelism runs on cpu (gloo) or cuda (nccl), not {device.type}")
    timeout_s = timeout_s or TP_TIMEOUT_S
    init_method = f"tcp://127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker_main, name=f"fleetserve-tp{r}", daemon=True,
                         args=(r, tp_size, init_method, fmt, str(path), device.type, dtype, max_len, os.getpid(),
                               timeout_s, quantization))
             for r in range(1, tp_size)]
    for p in procs:
        p.start()
    dev0 = _rank_device(device, 0)
    try:
        tp = init_tensor_parallel(0, tp_size, init_method, dev0, timeout_s)
        model, cfg = load_model(fmt, path, dev0, dtype, max_len, progress=progress, tp=tp, quantization=quantization)
    except BaseException:
        for p in procs:
            p.kill()
            p.join(2)
        destroy_tensor_parallel()
        raise
    log.info("tensor parallelism: %d ranks (%s), %d query + %d KV heads per rank; worker pids %s",
             tp_size, "nccl" if device.type == "cuda" else "gloo", cfg.num_heads // tp_size,
             max(1, cfg.num_kv_heads // tp_size), ", ".join(str(p.pid) for p in procs))
    return TensorParallelModel(model, procs, dev0), cfg


def _watch_parent(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)  # rank 0 is gone: nobody will ever send the next step

    threading.Thread(target=watch, name="fleetserve-tp-watchdog", daemon=True).start()


def worker_main(rank: int, size: int, init_method: str, fmt: str, path: str, device_type: str, dtype: torch.dtype,
                max_len: int | None, parent_pid: int, timeout_s: float, quantization: str | None = None) -> None:
    """Rank `rank` (>= 1): load the shard, then follow rank 0's messages until "stop" or a broken group."""
    _watch_parent(parent_pid)
    device = _rank_device(torch.device(device_type), rank)
    if device.type == "cpu":  # the ranks share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    torch.set_grad_enabled(False)
    tp = init_tensor_parallel(rank, size, init_method, device, timeout_s)
    try:
        model, cfg = load_model(fmt, Path(path), device, dtype, max_len, tp=tp, quantization=quantization)
        dtype = next(model.parameters()).dtype
        kv: KVCache | None = None
        with torch.inference_mode():
            while True:
                box = [None]
                dist.broadcast_object_list(box, src=0, group=tp.cpu_group)
                kind, *args = box[0]
                if kind == "forward":
                    ids, positions, meta = _to_device(args, device)
                    model(ids, positions, kv.layers, meta)
                elif kind == "logits":
                    hidden = torch.empty(args[0], cfg.hidden_size, dtype=dtype, device=device)
                    dist.broadcast(hidden, src=0, group=tp.group)
                    model.compute_logits(hidden)
                elif kind == "kv":
                    kv = KVCache(cfg, args[0], args[1], args[2], device, tp_size=size)
                elif kind == "stop":
                    return
    finally:
        destroy_tensor_parallel()
