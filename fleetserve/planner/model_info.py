"""The shape of a model, for planning: heads, KV heads, layers, sizes, context, dtype, parameters.

Read from config.json in a local directory, in the Hugging Face cache, or (only when it is not
cached and downloads are allowed) from the Hub with `hf_hub_download` of config.json alone; a
local .gguf file and the embedded `default` model are read from their metadata. No weights are
ever downloaded here.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# The embedded default (SmolLM2-135M-Instruct, a Llama): its published config, so planning for it
# never needs the GGUF file.
DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30, "vocab_size": 49152,
    "max_position_embeddings": 8192, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelInfoError(ValueError):
    """The model's config cannot be found or read; the message says where it looked."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    model_type: str
    num_attention_heads: int
    num_kv_heads: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    head_dim: int
    dtype: str | None
    tie_word_embeddings: bool
    attention_bias: bool
    num_experts: int  # 0 for dense models
    num_params: int  # estimate from the shape
    embedding_params: int  # embeddings + LM head (kept in 16 bits by FP8 online quantization)
    source: str  # where the config came from
    quantization: str | None = None  # quantization_config.quant_method of a pre-quantized checkpoint

    @property
    def linear_params(self) -> int:
        return self.num_params - self.embedding_params

    def weight_bytes(self, bytes_per_weight: float, embedding_bytes: float = 2.0) -> int:
        """Bytes of weights when linear layers use `bytes_per_weight` (FP8: 1) and embeddings stay 16-bit."""
        if bytes_per_weight >= embedding_bytes:
            return int(self.num_params * bytes_per_weight)
        return int(self.linear_params * bytes_per_weight + self.embedding_params * embedding_bytes)

    def kv_heads_per_gpu(self, tp: int) -> int:
        """KV heads one GPU holds: split when TP divides them, replicated (1 per GPU) when TP exceeds them."""
        return max(1, -(-self.num_kv_heads // tp))

    def kv_bytes_per_token(self, kv_bytes: float, tp: int = 1) -> float:
        """KV cache bytes one token costs on one GPU of a TP group (K and V, every layer)."""
        return 2 * self.num_layers * self.kv_heads_per_gpu(tp) * self.head_dim * kv_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate_params(cfg: dict[str, Any]) -> tuple[int, int]:
    """(total parameters, embedding + LM head parameters) of a Llama-family decoder (MoE aware)."""
    h = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or h // heads
    layers = cfg["num_hidden_layers"]
    vocab = cfg["vocab_size"]
    tied = bool(cfg.get("tie_word_embeddings", False))
    q, kvp = heads * hd, kv * hd
    attn = h * q + 2 * h * kvp + q * h
    if cfg.get("attention_bias", cfg.get("model_type") == "qwen2"):
        attn += q + 2 * kvp
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    if experts:
        inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        mlp = experts * 3 * h * inter + h * experts  # experts + router
        shared = cfg.get("shared_expert_intermediate_size") or 0
        if shared:
            mlp += 3 * h * shared + h
    else:
        mlp = 3 * h * cfg["intermediate_size"]
    norms = 2 * h
    embed = vocab * h * (1 if tied else 2)
    total = layers * (attn + mlp + norms) + embed + h
    return int(total), int(embed)


def model_info_from_config(cfg: dict[str, Any], name: str, source: str) -> ModelInfo:
    """A ModelInfo from a config.json dict; a missing required key is a ModelInfoError naming it."""
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):  # multimodal wrappers
        cfg = {**cfg, **cfg["text_config"]}
    required = ["hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"]
    missing = [k for k in required if not isinstance(cfg.get(k), int)]
    if missing or not isinstance(cfg.get("intermediate_size") or cfg.get("moe_intermediate_size"), int):
        missing = missing or ["intermediate_size"]
        raise ModelInfoError(f"{source}: config.json has no {', '.join(missing)}; fleetserve plans decoder-only "
                             "transformer models (Llama, Qwen, Mistral, ...) whose config.json has them")
    heads = cfg["num_attention_heads"]
    num_params, embed = estimate_params(cfg)
    archs = cfg.get("architectures") or [cfg.get("model_type") or "unknown"]
    return ModelInfo(
        name=name,
        architecture=str(archs[0]),
        model_type=str(cfg.get("model_type") or ""),
        num_attention_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=int(cfg.get("intermediate_size") or cfg.get("moe_intermediate_size")),
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
        num_experts=int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0),
        num_params=num_params,
        embedding_params=embed,
        source=source,
        quantization=_quant_method(cfg),
    )


def _quant_method(cfg: dict[str, Any]) -> str | None:
    q = cfg.get("quantization_config")
    if isinstance(q, dict):
        method = q.get("quant_method") or q.get("quant_type")
        return str(method).lower() if method else "unknown"
    return None


def load_model_info(
    model: str,
    *,
    revision: str | None = None,
    hf_token: str | None = None,
    cache_dir: str | Path | None = None,
    download: bool = True,
) -> ModelInfo:
    """The shape of `model`: 'default', a local directory / config.json / .gguf, or a Hub id org/name."""
    spec = (model or "").strip()
    if spec in ("", "default"):
        return model_info_from_config(DEFAULT_MODEL_CONFIG, DEFAULT_MODEL_NAME, "built-in (embedded default model)")
    local = Path(spec).expanduser()
    if local.exists():
        return _from_local(local, spec)
    if spec.startswith(("/", "./", "../", "~")) or spec.lower().endswith((".gguf", ".json")):
        raise ModelInfoError(f"{spec}: no such file or directory")
    if not _HUB_ID.match(spec):
        raise ModelInfoError(f"{spec!r} is neither an existing path nor a Hugging Face Hub id org/name")
    return _from_hub(spec, revision, hf_token, cache_dir, download)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelInfoError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelInfoError(f"{path} is not a JSON object")
    return data


def _from_local(path: Path, spec: str) -> ModelInfo:
    if path.is_dir():
        cfg = path / "config.json"
        if cfg.is_file():
            return model_info_from_config(_read_json(cfg), spec, str(cfg))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _from_gguf(ggufs[0], spec)
        raise ModelInfoError(f"{spec} has no config.json" + (f" and {len(ggufs)} .gguf files" if ggufs else ""))
    if path.name == "config.json" or path.suffix == ".json":
        return model_info_from_config(_read_json(path), spec, str(path))
    if path.suffix.lower() == ".gguf":
        return _from_gguf(path, spec)
    raise ModelInfoError(f"{spec} is neither a model directory, a config.json nor a .gguf file")


def _from_gguf(path: Path, spec: str) -> ModelInfo:
    try:
        import gguf

        from fleetserve.engine.native.model_config import ModelConfig

        reader = gguf.GGUFReader(str(path))
        mc = ModelConfig.from_gguf(reader, {t.name for t in reader.tensors})
    except Exception as exc:  # noqa: BLE001 -- any unreadable file becomes one message
        raise ModelInfoError(f"cannot read GGUF metadata of {path}: {type(exc).__name__}: {exc}") from None
    cfg = {
        "architectures": [mc.architecture], "model_type": mc.architecture, "hidden_size": mc.hidden_size,
        "intermediate_size": mc.intermediate_size, "num_attention_heads": mc.num_heads,
        "num_key_value_heads": mc.num_kv_heads, "num_hidden_layers": mc.num_layers, "vocab_size": mc.vocab_size,
        "max_position_embeddings": mc.max_position_embeddings, "head_dim": mc.head_dim,
        "tie_word_embeddings": mc.tie_word_embeddings, "attention_bias": mc.attention_bias,
    }
    return model_info_from_config(cfg, spec, str(path))


def _from_hub(repo_id: str, revision: str | None, token: str | None, cache_dir, download: bool) -> ModelInfo:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    where = repo_id + (f"@{revision}" if revision else "")
    cache = str(cache_dir) if cache_dir is not None else None
    cached = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache, revision=revision)
    if isinstance(cached, str):
        return model_info_from_config(_read_json(Path(cached)), repo_id, f"Hugging Face cache ({cached})")
    if not download:
        raise ModelInfoError(f"config.json of {where} is not in the Hugging Face cache and downloads are disabled; "
                             f"run `fleetserve models pull {repo_id}` or pass a local path")
    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision, token=token, cache_dir=cache)
    except Exception as exc:  # noqa: BLE001 -- one clear, token-free message for every hub failure
        from fleetserve.models.resolve import _hub_error_message

        message = _hub_error_message(where, exc)
        raise ModelInfoError(message.replace(token, "***") if token else message) from None
    return model_info_from_config(_read_json(Path(path)), repo_id, f"Hugging Face Hub ({where})")
