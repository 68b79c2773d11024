"""The shape of a Llama-family model, read from a HF config.json or from GGUF metadata.

Llama, Mistral, Qwen2, Qwen3 and SmolLM differ only in a few switches (QKV bias, per-head QK
norm, tied embeddings, RoPE scaling, sliding window), so one dataclass and one model cover them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_GGUF_ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3"}
SUPPORTED_ROPE_TYPES = {"default", "linear", "llama3", "yarn", "dynamic"}


class UnsupportedModelError(ValueError):
    pass


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    hidden_act: str = "silu"

    @classmethod
    def from_hf_dir(cls, path: Path) -> ModelConfig:
        return cls.from_hf_dict(json.loads((Path(path) / "config.json").read_text()))

    @classmethod
    def from_hf_dict(cls, c: dict[str, Any]) -> ModelConfig:
        archs = c.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"unsupported model architecture {archs or c.get('model_type')!r}; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        num_heads = c["num_attention_heads"]
        hidden = c["hidden_size"]
        rope_scaling = c.get("rope_scaling") or None
        rope_theta = c.get("rope_theta")
        rope_params = c.get("rope_parameters")  # transformers 5 layout
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = dict(rope_params)
        sliding = c.get("sliding_window") if c.get("use_sliding_window", True) else None
        cfg = cls(
            architecture=arch,
            vocab_size=c["vocab_size"],
            hidden_size=hidden,
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=c.get("num_key_value_heads") or num_heads,
            head_dim=c.get("head_dim") or hidden // num_heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta or 10000.0),
            max_position_embeddings=c.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            attention_bias=bool(c.get("attention_bias", arch == "qwen2")),
            qk_norm=arch == "qwen3",
            rope_scaling=rope_scaling,
            sliding_window=sliding,
            hidden_act=c.get("hidden_act", "silu"),
        )
        cfg.validate()
        return cfg

    @classmethod
    def from_gguf(cls, reader: Any, tensor_names: set[str]) -> ModelConfig:
        def field(key: str, default: Any = None) -> Any:
            f = reader.fields.get(key)
            return f.contents() if f is not None else default

        arch = field("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported GGUF architecture {arch!r}; supported: {', '.join(sorted(SUPPORTED_GGUF_ARCHITECTURES))}"
            )
        hidden = int(field(f"{arch}.embedding_length"))
        num_heads = int(field(f"{arch}.attention.head_count"))
        vocab = field(f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
        rope_scaling = None
        scaling_type = field(f"{arch}.rope.scaling.type")
        if scaling_type and scaling_type != "none":
            rope_scaling = {"rope_type": scaling_type, "factor": float(field(f"{arch}.rope.scaling.factor", 1.0))}
            orig = field(f"{arch}.rope.scaling.original_context_length")
            if orig:
                rope_scaling["original_max_position_embeddings"] = int(orig)
        cfg = cls(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(field(f"{arch}.feed_forward_length")),
            num_layers=int(field(f"{arch}.block_count")),
            num_heads=num_heads,
            num_kv_heads=int(field(f"{arch}.attention.head_count_kv", num_heads)),
            head_dim=int(field(f"{arch}.attention.key_length", hidden // num_heads)),
            rms_norm_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(field(f"{arch}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(field(f"{arch}.context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            rope_scaling=rope_scaling,
            sliding_window=field(f"{arch}.attention.sliding_window"),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.hidden_act not in ("silu", "swish"):
            raise UnsupportedModelError(f"unsupported activation {self.hidden_act!r}; supported: silu")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads})"
            )
        if self.rope_scaling:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in SUPPORTED_ROPE_TYPES:
                raise UnsupportedModelError(
                    f"unsupported rope scaling {kind!r}; supported: {', '.join(sorted(SUPPORTED_ROPE_TYPES))}"
                )

    def kv_bytes_per_token(self, element_size: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size
