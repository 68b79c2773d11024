"""Weights from HF safetensors (single or sharded with an index) or a GGUF file (dequantised on load).

Everything is returned under Hugging Face parameter names so the model has one naming scheme.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from collections.abc import Iterator

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import safe_open

from fleetserve.engine.native.model_config import ModelConfig

_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=True,
    )


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def iter_safetensors(model_dir: Path, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    files = safetensors_files(model_dir)
    with _progress(progress) as bar:
        task = bar.add_task("Loading weights", total=len(files))
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
            bar.advance(task)


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores Q/K rows interleaved for its RoPE; undo it for the HF (rotate_half) layout."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def open_gguf(path: Path):
    import gguf

    return gguf.GGUFReader(str(path))


def iter_gguf(reader, cfg: ModelConfig, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf.quants import dequantize

    with _progress(progress) as bar:
        task = bar.add_task("Dequantising GGUF", total=len(reader.tensors))
        for t in reader.tensors:
            bar.advance(task)
            if t.name in _GGUF_GLOBAL:
                name = _GGUF_GLOBAL[t.name]
            else:
                m = _BLK.match(t.name)
                if not m or m.group(2) not in _GGUF_LAYER:
                    continue  # e.g. rope_freqs: recomputed from the config
                name = f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}"
            w = dequantize(t.data, t.tensor_type).reshape(list(reversed([int(d) for d in t.shape])))
            if cfg.architecture in ("llama", "mistral"):
                if t.name.endswith("attn_q.weight") or t.name.endswith("attn_q.bias"):
                    w = _reverse_permute(w, cfg.num_heads)
                elif t.name.endswith("attn_k.weight") or t.name.endswith("attn_k.bias"):
                    w = _reverse_permute(w, cfg.num_kv_heads)
            yield name, torch.from_numpy(np.array(w, dtype=np.float32))  # copy: the reader is a read-only memmap


def load_model_config_and_weights(
    fmt: str, path: Path, progress: bool = False
) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """Returns the model's config and a lazy stream of (hf_name, tensor)."""
    if fmt == "gguf":
        reader = open_gguf(path)
        cfg = ModelConfig.from_gguf(reader, {t.name for t in reader.tensors})
        return cfg, iter_gguf(reader, cfg, progress)
    cfg = ModelConfig.from_hf_dir(path)
    return cfg, iter_safetensors(path, progress)
