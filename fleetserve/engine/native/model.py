"""One Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM) over a flattened token batch.

Q/K/V and gate/up projections are fused into single matmuls; numerics otherwise follow the
reference implementation (fp32 RMSNorm, rotate_half RoPE) so greedy outputs match it exactly.
With tensor parallelism (`tp`, see parallel.py) each rank builds the same modules over its shard:
its query and KV heads, its slice of the MLP width and of the vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fleetserve.engine.native import cpu_kernels
from fleetserve.engine.native.attention import AttentionMetadata, paged_attention
from fleetserve.engine.native.linear import Linear
from fleetserve.engine.native.model_config import ModelConfig
from fleetserve.engine.native.parallel import (
    SINGLE,
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    TPGroup,
    VocabParallelEmbedding,
    local_kv_heads,
)
from fleetserve.engine.native.rope import apply_rope, rope_cache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        dtype = x.dtype
        if fused:
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        if dtype == torch.float32:  # one torch op, bit-identical to the steps below in fp32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup = SINGLE):
        super().__init__()
        nh, nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.nh, self.nkv = nh // tp.size, local_kv_heads(nkv, tp.size)  # this rank's heads
        self.q_size, self.kv_size = self.nh * self.hd, self.nkv * self.hd
        q_part, kv_part = (nh * self.hd, nh), (nkv * self.hd, nkv)
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, [q_part, kv_part, kv_part], cfg.attention_bias, tp)
        self.o_proj = RowParallelLinear(nh * self.hd, cfg.hidden_size, tp)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = self.hd**-0.5
        self.sliding_window = cfg.sliding_window

    def forward(self, x, cos, sin, k_cache, v_cache, meta: AttentionMetadata, fused: bool = False) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x).view(t, self.nh + 2 * self.nkv, self.hd)
        if fused and self.q_norm is None:  # q and k heads rotated in place by one C call
            cpu_kernels.rope_(qkv, self.nh + self.nkv, cos, sin)
            q, k, v = qkv.split([self.nh, self.nkv, self.nkv], dim=1)
        elif self.q_norm is not None:
            q, k, v = qkv.split([self.nh, self.nkv, self.nkv], dim=1)
            q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        else:  # q and k heads are adjacent: rotate them with one set of ops
            qk = apply_rope(qkv[:, : self.nh + self.nkv], cos, sin)
            q, k, v = qk[:, : self.nh], qk[:, self.nh :], qkv[:, self.nh + self.nkv :]
        o = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale, self.sliding_window)
        return self.o_proj(o.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup = SINGLE):
        super().__init__()
        inter = cfg.intermediate_size
        self.inter = inter // tp.size
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [(inter, inter)] * 2, False, tp)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, tp)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if fused:
            return self.down_proj(cpu_kernels.silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup = SINGLE):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp)

    def forward(self, x, cos, sin, k_cache, v_cache, meta, fused: bool = False):
        """`fused`: the per-layer norms, RoPE and SiLU go through the C kernels (LlamaModel.forward decides)."""
        x = x + self.self_attn(self.input_layernorm(x, fused), cos, sin, k_cache, v_cache, meta, fused)
        return x + self.mlp(self.post_attention_layernorm(x, fused), fused)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int, tp: TPGroup = SINGLE):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, tp)
        self.max_len = max_len
        self.rope_cos = self.rope_sin = None
        self.matmul_dtype: torch.dtype | None = None  # bf16 on a CPU in bf16 mode (loader.activation_dtype)
        self._decode_layers: cpu_kernels.DecodeLayers | None | bool = False  # False: not decided yet

    def init_rope(self, device: torch.device) -> None:
        """RoPE tables are derived state: built after the parameters are materialised."""
        cos, sin = rope_cache(self.cfg, self.max_len)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] for the flattened batch (logits are computed for selected rows only)."""
        x = self.embed_tokens(input_ids)
        cos = self.rope_cos[positions].to(x.dtype)
        sin = self.rope_sin[positions].to(x.dtype)
        # the C kernels of the "cpu" backend also take the per-layer norm, RoPE and SiLU of an fp32 model
        fused = meta.backend == "cpu" and x.dtype == torch.float32
        if fused and meta.num_decode == x.shape[0] and (layers := self.decode_layers()) is not None:
            layers.run(x, cos, sin, kv_caches, meta.decode_block_tables, meta.decode_context_lens)
            return self.norm(x, fused)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, k_cache, v_cache, meta, fused)
        return self.norm(x, fused)

    def decode_layers(self) -> cpu_kernels.DecodeLayers | None:
        """All decoder layers of a pure decode step as one C call (cpu_kernels.DecodeLayers), for an fp32 model
        on one rank whose linear weights are all kept low-bit (prepack) and whose layers have no q/k norms;
        None for any other model. Decided once, after prepack."""
        if self._decode_layers is False:
            self._decode_layers = None
            attn0 = self.layers[0].self_attn
            linears = [(layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
                       for layer in self.layers]
            if self.tp.size == 1 and attn0.q_norm is None and all(m.lowbit is not None for ms in linears for m in ms):
                weights = [cpu_kernels.LayerWeights(layer.input_layernorm.weight.detach(),
                                                    layer.post_attention_layernorm.weight.detach(),
                                                    [(m.lowbit, None if m.bias is None else m.bias.detach()) for m in ms])
                           for layer, ms in zip(self.layers, linears)]
                self._decode_layers = cpu_kernels.DecodeLayers(
                    weights, hq=attn0.nh, hkv=attn0.nkv, d=attn0.hd, inter=self.layers[0].mlp.inter,
                    eps=self.layers[0].input_layernorm.eps, scale=attn0.scale, window=attn0.sliding_window)
        return self._decode_layers

    def quantize_fp8(self) -> tuple[int, int]:
        """FP8 weights for the decoder layers (the LM head and embeddings stay). Returns (done, skipped)."""
        done = [m.quantize_fp8() for m in self.layers.modules() if isinstance(m, Linear)]
        return sum(done), len(done) - sum(done)

    def prepack(self, matmul_dtype: torch.dtype | None = None) -> None:
        self.matmul_dtype = matmul_dtype
        self._decode_layers = False
        for m in self.modules():
            if isinstance(m, Linear):
                m.prepack(matmul_dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.gather(self.lm_head(hidden)).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors, fusing q/k/v and gate/up as they arrive (each rank keeps its shard)."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
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
                if pname not in params:
                    raise ValueError(f"checkpoint has a tensor this model does not know: {name}")
                modules[".".join(parts[:-2] + [target])].load_part(parts[-1], idx, w)
                loaded.add(f"{pname}#{idx}")
                continue
            if name not in params:
                raise ValueError(f"checkpoint has a tensor this model does not know: {name}")
            owner, _, param = name.rpartition(".")
            if hasattr(modules[owner], "load_shard"):  # row-parallel, embedding, LM head: this rank's slice
                modules[owner].load_shard(param, w)
                loaded.add(name)
                continue
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
