"""Model info from config.json fixtures (published values), the HF cache layout and the Hub fallback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fleetserve.planner import model_info as mi
from fleetserve.planner.model_info import ModelInfoError, load_model_info

CONFIGS = Path(__file__).parent / "fixtures" / "model_configs"


def fixture_model(name: str) -> mi.ModelInfo:
    return load_model_info(str(CONFIGS / name))


@pytest.mark.parametrize("name, heads, kv, layers, hidden, inter, vocab, max_pos, params_b, tied", [
    ("Llama-3.1-8B-Instruct", 32, 8, 32, 4096, 14336, 128256, 131072, 8.03, False),
    ("Llama-3.1-70B-Instruct", 64, 8, 80, 8192, 28672, 128256, 131072, 70.55, False),
    ("Qwen2.5-7B-Instruct", 28, 4, 28, 3584, 18944, 152064, 32768, 7.62, False),
    ("Qwen2.5-0.5B-Instruct", 14, 2, 24, 896, 4864, 151936, 32768, 0.49, True),
    ("Mistral-7B-Instruct-v0.3", 32, 8, 32, 4096, 14336, 32768, 32768, 7.25, False),
])
def test_published_shapes(name, heads, kv, layers, hidden, inter, vocab, max_pos, params_b, tied):
    info = fixture_model(name)
    assert (info.num_attention_heads, info.num_kv_heads, info.num_layers, info.hidden_size,
            info.intermediate_size, info.vocab_size, info.max_position_embeddings) == (
        heads, kv, layers, hidden, inter, vocab, max_pos)
    assert info.head_dim == hidden // heads
    assert info.dtype == "bfloat16" and info.tie_word_embeddings is tied
    # Published parameter counts (model cards): 8.03B, 70.6B, 7.61B, 0.49B, 7.25B.
    assert info.num_params / 1e9 == pytest.approx(params_b, abs=0.01)
    assert info.source.endswith("config.json")


def test_kv_bytes_per_token_split_and_replicated():
    qwen = fixture_model("Qwen2.5-7B-Instruct")  # 28 layers, 4 KV heads of 128
    assert qwen.kv_bytes_per_token(2) == 2 * 28 * 4 * 128 * 2  # 57,344 bytes, bf16
    assert qwen.kv_bytes_per_token(1, tp=2) == 2 * 28 * 2 * 128  # fp8, 2 heads per GPU
    assert qwen.kv_heads_per_gpu(8) == 1  # TP beyond KV heads replicates them


def test_fp8_weights_keep_embeddings_in_16_bits():
    llama = fixture_model("Llama-3.1-8B-Instruct")
    assert llama.embedding_params == 2 * 128256 * 4096
    assert llama.weight_bytes(2) == llama.num_params * 2
    assert llama.weight_bytes(1) == llama.linear_params + 2 * llama.embedding_params


def test_config_json_path_and_missing_fields(tmp_path):
    info = load_model_info(str(CONFIGS / "Mistral-7B-Instruct-v0.3" / "config.json"))
    assert info.architecture == "MistralForCausalLM"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "whisper", "d_model": 512}))
    with pytest.raises(ModelInfoError, match="has no hidden_size, num_attention_heads"):
        load_model_info(str(bad))
    with pytest.raises(ModelInfoError, match="no such file"):
        load_model_info("./does/not/exist")
    with pytest.raises(ModelInfoError, match="neither an existing path nor a Hugging Face Hub id"):
        load_model_info("not a model")


def test_default_model_is_built_in():
    info = load_model_info("default")
    assert (info.num_attention_heads, info.num_kv_heads, info.num_layers) == (9, 3, 30)
    assert info.num_params / 1e6 == pytest.approx(134.5, abs=0.5)


def _hf_cache(root: Path, repo: str, config_src: Path, commit: str = "a" * 40) -> Path:
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<commit>/config.json}."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.copy(config_src, snap / "config.json")
    return snap


def test_hub_id_from_the_cache_without_network(tmp_path, monkeypatch):
    _hf_cache(tmp_path, "Qwen/Qwen2.5-7B-Instruct", CONFIGS / "Qwen2.5-7B-Instruct" / "config.json")

    def no_network(*a, **k):
        raise AssertionError("must not download when cached")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_network)
    info = load_model_info("Qwen/Qwen2.5-7B-Instruct", cache_dir=tmp_path)
    assert info.name == "Qwen/Qwen2.5-7B-Instruct" and info.num_attention_heads == 28
    assert info.source.startswith("Hugging Face cache")


def test_hub_download_only_when_not_cached(tmp_path, monkeypatch):
    calls = []

    def fake_download(repo_id, filename, *, revision=None, token=None, cache_dir=None):
        calls.append((repo_id, filename, revision, token))
        return str(_hf_cache(tmp_path / "dl", repo_id, CONFIGS / "Llama-3.1-70B-Instruct" / "config.json")
                   / "config.json")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    info = load_model_info("meta-llama/Llama-3.1-70B-Instruct", hf_token="hf_secret123", cache_dir=tmp_path / "c")
    assert calls == [("meta-llama/Llama-3.1-70B-Instruct", "config.json", None, "hf_secret123")]
    assert info.num_layers == 80 and info.source.startswith("Hugging Face Hub")


def test_hub_disabled_or_failing_says_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ModelInfoError, match="not in the Hugging Face cache and downloads are disabled"):
        load_model_info("org/model", cache_dir=tmp_path, download=False)

    def offline(*a, token=None, **k):
        raise ConnectionError(f"cannot reach huggingface.co with {token}")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    with pytest.raises(ModelInfoError) as exc:
        load_model_info("org/model", cache_dir=tmp_path, hf_token="hf_topsecret")
    assert "could not reach the Hugging Face Hub" in str(exc.value) and "hf_topsecret" not in str(exc.value)


def test_local_gguf_when_the_default_model_is_cached():
    from fleetserve.models import ModelResolutionError, default_model_file

    try:
        path = default_model_file(download=False, progress=False)
    except (ModelResolutionError, OSError, TypeError):
        pytest.skip("the embedded default model is not cached on this machine")
    info = load_model_info(str(path))
    assert (info.num_attention_heads, info.num_kv_heads, info.num_layers, info.hidden_size) == (9, 3, 30, 576)
