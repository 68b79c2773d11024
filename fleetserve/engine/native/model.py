"""One Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM) over a flattened token batch.

Q/K/V and gate/up projections are fused into single matmuls; numerics otherwise follow the
reference implementation (fp32 RMSNorm, rotate_half RoPE) so greedy outputs match it exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fleetserve.engine.native import fp8
from fleetserve.engine.native.attention import AttentionMetadata, paged_attention
from fleetserve.engine.native.model_config import ModelConfig
from fleetserve.engine.native.rope import apply_rope, rope_cache


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _onednn_linear_available()
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


class Linear(nn.Linear):
    """nn.Linear whose CPU matmuls go through oneDNN: measured 1.4x (batch 16) to 5x (batch 32) faster
    than the default BLAS path on this project's AMD CPUs (docs/perf.md), same results to fp32 rounding.

    `prepack()` reorders the weight once into oneDNN's blocked layout (another 25-35% at batch 16, since
    the plain path reorders on every call); the plain weight is then dropped unless it is shared.
    """

    packed: torch.Tensor | None = None
    qweight: torch.Tensor | None = None  # FP8 weight and its per-channel scale (fp8.py)
    w_scale: torch.Tensor | None = None

    def prepack(self, batch_hint: int = 16) -> None:
        if self.qweight is not None or not (
                _ONEDNN and self.weight.device.type == "cpu" and self.weight.dtype in _ONEDNN_DTYPES):
            return
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), batch_hint)

    def quantize_fp8(self) -> bool:
        if not fp8.fp8_supported(self.in_features, self.out_features):
            return False
        self.qweight, self.w_scale = fp8.quantize_weight(self.weight.detach())
        self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)  # the fp8 copy replaces it
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return fp8.fp8_linear(x, self.qweight, self.w_scale, self.bias)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if _ONEDNN and x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32:  # one fused kernel, bit-identical to the steps below in fp32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = self.nh * self.hd, self.nkv * self.hd
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = self.hd**-0.5
        self.sliding_window = cfg.sliding_window

    def forward(self, x, cos, sin, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x).view(t, self.nh + 2 * self.nkv, self.hd)
        if self.q_norm is not None:
            q, k, v = qkv.split([self.nh, self.nkv, self.nkv], dim=1)
            q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        else:  # q and k heads are adjacent: rotate them with one set of ops
            qk = apply_rope(qkv[:, : self.nh + self.nkv], cos, sin)
            q, k, v = qk[:, : self.nh], qk[:, self.nh :], qkv[:, self.nh + self.nkv :]
        o = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale, self.sliding_window)
        return self.o_proj(o.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, k_cache, v_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.max_len = max_len
        self.rope_cos = self.rope_sin = None

    def init_rope(self, device: torch.device) -> None:
        """RoPE tables are derived state: built after the parameters are materialised."""
        cos, sin = rope_cache(self.cfg, self.max_len)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] for the flattened batch (logits are computed for selected rows only)."""
        x = self.embed_tokens(input_ids)
        cos = self.rope_cos[positions].to(x.dtype)
        sin = self.rope_sin[positions].to(x.dtype)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, k_cache, v_cache, meta)
        return self.norm(x)

    def quantize_fp8(self) -> tuple[int, int]:
        """FP8 weights for the decoder layers (the LM head and embeddings stay). Returns (done, skipped)."""
        done = [m.quantize_fp8() for m in self.layers.modules() if isinstance(m, Linear)]
        return sum(done), len(done) - sum(done)

    def prepack(self) -> None:
        for m in self.modules():
            if isinstance(m, Linear):
                m.prepack()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors, fusing q/k/v and gate/up as they arrive."""
        params = dict(self.named_parameters())
        fused = {
            "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
        }
        loaded: set[str] = set()
        for name, w in weights:
            name = name.removeprefix("model.") if not name.startswith("lm_head") else name
            if "rotary_emb" in name:
                continue
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in fused:
                target, idx = fused[parts[-2]]
                pname = ".".join(parts[:-2] + [target, parts[-1]])
                p = params[pname]
                if target == "qkv_proj":
                    a = self.layers[0].self_attn
                    sizes = [a.q_size, a.kv_size, a.kv_size]
                else:
                    sizes = [self.cfg.intermediate_size] * 2
                off = sum(sizes[:idx])
                p.data[off : off + sizes[idx]].copy_(w)
                loaded.add(f"{pname}#{idx}")
                continue
            if name not in params:
                raise ValueError(f"checkpoint has a tensor this model does not know: {name}")
            if params[name].shape != w.shape:
                raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(w.shape)} vs model "
                                 f"{tuple(params[name].shape)}")
            params[name].data.copy_(w)
            loaded.add(name)
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
            loaded.add("lm_head.weight")
        expected = set()
        for pname in params:
            target = pname.split(".")[-2] if "." in pname else ""
            if target in ("qkv_proj", "gate_up_proj"):
                n = 3 if target == "qkv_proj" else 2
                expected.update(f"{pname}#{i}" for i in range(n))
            else:
                expected.add(pname)
        missing = expected - loaded
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
