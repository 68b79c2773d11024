"""Config precedence and provenance, device/dtype choice, and log redaction (all fast, no model)."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest
import torch
import yaml
from rich.console import Console

from fleetserve import logs
from fleetserve.config import (
    FIELDS,
    GPU_FIELDS,
    ConfigError,
    ServeConfig,
    config_as_dict,
    load_serve_config,
    render_config,
)
from fleetserve.device import resolve_device, resolve_dtype

TOKEN = "hf_abcdefghijklmnopqrstuvwxyz123456"


@pytest.fixture
def yaml_file(tmp_path):
    def write(data) -> object:
        path = tmp_path / "serve.yaml"
        path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
        return path

    return write


# ------------------------------------------------------------------ precedence


def test_defaults_and_provenance():
    cfg, sources = load_serve_config({}, env={})
    assert cfg == ServeConfig()
    assert (cfg.model, cfg.host, cfg.port, cfg.precision, cfg.block_size) == ("default", "127.0.0.1", 8000, "auto", 16)
    assert set(sources) == set(FIELDS)
    assert set(sources.values()) == {"default"}


# Each ladder lists (layer, value, expected source) from the highest precedence to the lowest.
# The test sets every layer, checks the top one wins, removes it, and repeats down to the default.
LADDERS = {
    "port": [
        ("cli", 9001, "cli"),
        ("env:FLEETSERVE_PORT", "9002", "env FLEETSERVE_PORT"),
        ("env:PORT", "9003", "env PORT"),
        ("env:HATHORA_DEFAULT_PORT", "9004", "env HATHORA_DEFAULT_PORT"),
        ("json:port", 9005, "DEPLOYMENT_CONFIG_JSON"),
        ("yaml:port", 9006, "yaml"),
        (None, 8000, "default"),
    ],
    "model": [
        ("cli", "m-cli", "cli"),
        ("env:FLEETSERVE_MODEL", "m-fs", "env FLEETSERVE_MODEL"),
        ("env:MODEL_PATH", "m-seed", "env MODEL_PATH"),
        ("json:model_id", "m-json", "DEPLOYMENT_CONFIG_JSON"),
        ("yaml:model", "m-yaml", "yaml"),
        (None, "default", "default"),
    ],
    "kv_cache_tokens": [
        ("cli", 1000, "cli"),
        ("env:FLEETSERVE_KV_CACHE_TOKENS", "2000", "env FLEETSERVE_KV_CACHE_TOKENS"),
        ("env:MAX_TOTAL_TOKENS", "3000", "env MAX_TOTAL_TOKENS"),
        ("json:max_total_tokens", 4000, "DEPLOYMENT_CONFIG_JSON"),
        ("yaml:kv_cache_tokens", 5000, "yaml"),
        (None, None, "default"),
    ],
    "log_level": [
        ("cli", "ERROR", "cli"),
        ("env:FLEETSERVE_LOG_LEVEL", "Warning", "env FLEETSERVE_LOG_LEVEL"),
        ("env:LOG_LEVEL", "DEBUG", "env LOG_LEVEL"),
        ("json:log_level", "error", "DEPLOYMENT_CONFIG_JSON"),
        ("yaml:log_level", "warning", "yaml"),
        (None, "info", "default"),
    ],
    "host": [
        ("cli", "10.0.0.1", "cli"),
        ("env:FLEETSERVE_HOST", "10.0.0.2", "env FLEETSERVE_HOST"),
        ("env:HOST", "10.0.0.3", "env HOST"),
        ("json:host", "10.0.0.4", "DEPLOYMENT_CONFIG_JSON"),
        ("yaml:host", "10.0.0.5", "yaml"),
        (None, "127.0.0.1", "default"),
    ],
    "precision": [
        ("cli", "fp16", "cli"),
        ("env:FLEETSERVE_PRECISION", "fp32", "env FLEETSERVE_PRECISION"),
        ("json:dtype", "bfloat16", "DEPLOYMENT_CONFIG_JSON"),
        ("yaml:precision", "fp16", "yaml"),
        (None, "auto", "default"),
    ],
    "hf_token": [
        ("cli", "hf_cliaaaaaaaaaaaaaaaaaaaaaa", "cli"),
        ("env:FLEETSERVE_HF_TOKEN", "hf_fsaaaaaaaaaaaaaaaaaaaaaaa", "env FLEETSERVE_HF_TOKEN"),
        ("env:HF_TOKEN", "hf_seedaaaaaaaaaaaaaaaaaaaaa", "env HF_TOKEN"),
        ("json:hf_token", "hf_jsonaaaaaaaaaaaaaaaaaaaaa", "DEPLOYMENT_CONFIG_JSON"),
        ("yaml:hf_token", "hf_yamlaaaaaaaaaaaaaaaaaaaaa", "yaml"),
        (None, None, "default"),
    ],
    "max_batch_tokens": [
        ("cli", 111, "cli"),
        ("env:FLEETSERVE_MAX_BATCH_TOKENS", "222", "env FLEETSERVE_MAX_BATCH_TOKENS"),
        ("json:max_batch_tokens", 333, "DEPLOYMENT_CONFIG_JSON"),
        ("yaml:max_batch_tokens", 444, "yaml"),
        (None, 2048, "default"),
    ],
}


LADDERS.update({
    "backend": [
        ("cli", "vllm", "cli"),
        ("env:FLEETSERVE_BACKEND", "SGLang", "env FLEETSERVE_BACKEND"),
        ("json:backend", "vllm", "DEPLOYMENT_CONFIG_JSON"),
        ("yaml:backend", "sglang", "yaml"),
        (None, "native", "default"),
    ],
    "tp_size": [
        ("cli", 8, "cli"),
        ("env:FLEETSERVE_TP_SIZE", "4", "env FLEETSERVE_TP_SIZE"),
        ("env:TP_SIZE", "2", "env TP_SIZE"),
        ("json:tp_size", 3, "DEPLOYMENT_CONFIG_JSON"),
        ("yaml:tp_size", 5, "yaml"),
        (None, None, "default"),
    ],
    "quantization": [
        ("cli", "awq", "cli"),
        ("env:FLEETSERVE_QUANTIZATION", "GPTQ", "env FLEETSERVE_QUANTIZATION"),
        ("json:quantization", "fp8", "DEPLOYMENT_CONFIG_JSON"),
        ("yaml:quantization", "awq_marlin", "yaml"),
        (None, None, "default"),
    ],
    "speculative": [
        ("cli", "ngram", "cli"),
        ("env:FLEETSERVE_SPECULATIVE", "eagle3", "env FLEETSERVE_SPECULATIVE"),
        ("env:SPECULATIVE_ALGORITHM", "EAGLE", "env SPECULATIVE_ALGORITHM"),
        ("json:speculative", "ngram", "DEPLOYMENT_CONFIG_JSON"),
        ("yaml:speculative", "eagle3", "yaml"),
        (None, "none", "default"),
    ],
    "pd": [
        ("cli", "on", "cli"),
        ("env:FLEETSERVE_PD", "off", "env FLEETSERVE_PD"),
        ("env:ENABLE_PD_DEFAULTS", "false", "env ENABLE_PD_DEFAULTS"),
        ("json:pd", "on", "DEPLOYMENT_CONFIG_JSON"),
        ("yaml:pd", "off", "yaml"),
        (None, "auto", "default"),
    ],
})
# GPU-backend fields are rejected with the native engine: their ladders run with a GPU backend, set in the
# environment below every layer they test (DEPLOYMENT_CONFIG_JSON's own `backend` is never part of them).
GPU_LADDER_ENV = {"FLEETSERVE_BACKEND": "sglang"}


def _build(field, layers, tmp_path):
    cli, env, doc, yml = {}, {}, {}, {}
    for layer, value, _ in layers:
        if layer is None:
            continue
        kind, _, key = layer.partition(":")
        if kind == "cli":
            cli[field] = value
        elif kind == "env":
            env[key] = value
        elif kind == "json":
            doc[key] = value
        elif kind == "yaml":
            yml[key] = value
    if doc:
        env["DEPLOYMENT_CONFIG_JSON"] = json.dumps(doc)
    path = None
    if yml:
        path = tmp_path / "serve.yaml"
        path.write_text(yaml.safe_dump(yml))
    return cli, env, path


def _normalise(field, value):
    if field == "log_level" and isinstance(value, str):
        return value.lower()
    if field == "precision" and value == "bfloat16":
        return "bf16"
    if field in {"port", "kv_cache_tokens", "max_batch_tokens", "tp_size"} and value is not None:
        return int(value)
    if field in {"backend", "quantization", "speculative"} and isinstance(value, str):
        return value.lower()
    if field == "pd" and value == "false":  # ENABLE_PD_DEFAULTS=false: no PD
        return "off"
    return value


@pytest.mark.parametrize("field", sorted(LADDERS))
def test_each_level_beats_the_one_below(field, tmp_path):
    ladder = LADDERS[field]
    for i, (_, expected, expected_source) in enumerate(ladder):
        cli, env, path = _build(field, ladder[i:], tmp_path)
        if field != "backend" and field in GPU_FIELDS:
            env = {**GPU_LADDER_ENV, **env}
        cfg, sources = load_serve_config(cli, path, env=env)
        got = getattr(cfg, field)
        if field == "hf_token" and got is not None:
            got = got.get_secret_value()
        assert got == _normalise(field, expected), (field, ladder[i])
        if expected_source == "yaml":
            assert sources[field] == f"yaml {path}"
        else:
            assert sources[field] == expected_source, (field, ladder[i])


def test_hathora_sets_host_default_and_env_only_fields(yaml_file):
    env = {"HATHORA_REGION": "Frankfurt", "HATHORA_PROCESS_ID": "p-1", "HATHORA_HOSTNAME": "h.example",
           "HATHORA_DEFAULT_PORT": "7777"}
    cfg, sources = load_serve_config({}, env=env)
    assert (cfg.host, cfg.port) == ("0.0.0.0", 7777)
    assert sources["host"].startswith("default")
    assert sources["port"] == "env HATHORA_DEFAULT_PORT"
    assert (cfg.hathora_region, cfg.hathora_process_id, cfg.hathora_hostname) == ("Frankfurt", "p-1", "h.example")
    assert sources["hathora_region"] == "env HATHORA_REGION"
    # The Hathora host is only a default: a YAML file still beats it.
    cfg, sources = load_serve_config({}, yaml_file({"host": "127.0.0.2"}), env=env)
    assert cfg.host == "127.0.0.2"
    # Off Hathora the default stays loopback.
    assert load_serve_config({}, env={})[0].host == "127.0.0.1"


def test_env_only_fields_cannot_come_from_elsewhere():
    with pytest.raises(ConfigError, match="HATHORA_REGION"):
        load_serve_config({"hathora_region": "x"}, env={})
    with pytest.raises(ConfigError, match="HATHORA_REGION"):
        load_serve_config({}, env={"DEPLOYMENT_CONFIG_JSON": '{"hathora_region": "x"}'})
    # FLEETSERVE_HATHORA_REGION is not a thing: the value comes from HATHORA_REGION only.
    assert load_serve_config({}, env={"FLEETSERVE_HATHORA_REGION": "x"})[0].hathora_region is None


def test_empty_env_values_count_as_unset():
    cfg, sources = load_serve_config({}, env={"PORT": "", "HF_TOKEN": "  ", "FLEETSERVE_MODEL": ""})
    assert (cfg.port, cfg.hf_token, cfg.model) == (8000, None, "default")
    assert sources["port"] == "default"


def test_cli_none_values_are_ignored_and_unknown_keys_rejected():
    cfg, sources = load_serve_config({"port": None, "model": "m"}, env={"PORT": "9100"})
    assert (cfg.port, sources["port"], cfg.model) == (9100, "env PORT", "m")
    with pytest.raises(ConfigError, match="unknown option 'replicas'"):
        load_serve_config({"replicas": 2}, env={})


# ------------------------------------------------------------------ DEPLOYMENT_CONFIG_JSON and YAML


def test_deployment_json_seed_keys():
    doc = {"model_path": "org/model", "revision": "main", "dtype": "float16", "max_total_tokens": 4096,
           "hf_token": TOKEN, "port": 8100, "log_level": "DEBUG", "max_queued_requests": 9}
    cfg, sources = load_serve_config({}, env={"DEPLOYMENT_CONFIG_JSON": json.dumps(doc)})
    assert (cfg.model, cfg.revision, cfg.precision, cfg.kv_cache_tokens) == ("org/model", "main", "fp16", 4096)
    assert (cfg.port, cfg.log_level, cfg.max_queue_len) == (8100, "debug", 9)
    assert cfg.hf_token.get_secret_value() == TOKEN
    assert {sources[f] for f in ("model", "precision", "kv_cache_tokens", "hf_token")} == {"DEPLOYMENT_CONFIG_JSON"}


@pytest.mark.parametrize("key, value", [("gpu", {"type": "H100", "count": 2}), ("replicas", {"min": 1, "max": 2}),
                                        ("autoscale", {"target_concurrency": 4}), ("region", "Seattle"),
                                        ("image", "ghcr.io/me/img:1")])
def test_deployment_json_rejects_deployment_level_keys(key, value):
    env = {"DEPLOYMENT_CONFIG_JSON": json.dumps({"model_id": "org/m", key: value})}
    with pytest.raises(ConfigError) as info:
        load_serve_config({}, env=env)
    message = str(info.value)
    assert key in message and "not supported yet" in message and "DEPLOYMENT_CONFIG_JSON" in message
    assert info.value.field == key and info.value.source == "DEPLOYMENT_CONFIG_JSON"


def test_deployment_json_gpu_keys_of_seed_000_are_accepted():
    doc = {"model_id": "org/m", "tp_size": 2, "quantization": "FP8", "kv_cache_dtype": "fp8_e5m2",
           "mem_fraction_static": 0.8, "schedule_conservativeness": 0.5, "enable_metrics": True,
           "enable_p2p_check": True, "enable_torch_compile": False, "h100_only": True, "auto_use_fp8_on_h100": False,
           "backend": "sglang"}
    cfg, sources = load_serve_config({}, env={"DEPLOYMENT_CONFIG_JSON": json.dumps(doc)})
    assert (cfg.backend, cfg.tp_size, cfg.quantization, cfg.kv_cache_dtype) == ("sglang", 2, "fp8", "fp8_e5m2")
    assert (cfg.mem_fraction_static, cfg.schedule_conservativeness, cfg.enable_p2p_check, cfg.h100_only,
            cfg.auto_use_fp8_on_h100) == (0.8, 0.5, True, True, False)
    assert {sources[k] for k in doc if k != "model_id"} == {"DEPLOYMENT_CONFIG_JSON"}


def test_deployment_json_errors_are_clear_and_never_echo_the_document():
    with pytest.raises(ConfigError, match="unknown field 'colour'"):
        load_serve_config({}, env={"DEPLOYMENT_CONFIG_JSON": '{"colour": "blue"}'})
    with pytest.raises(ConfigError, match="mapping"):
        load_serve_config({}, env={"DEPLOYMENT_CONFIG_JSON": "[1, 2]"})
    with pytest.raises(ConfigError, match="twice"):
        load_serve_config({}, env={"DEPLOYMENT_CONFIG_JSON": '{"model": "a", "model_id": "b"}'})
    with pytest.raises(ConfigError) as info:
        load_serve_config({}, env={"DEPLOYMENT_CONFIG_JSON": '{"hf_token": "' + TOKEN + '", '})
    assert "not valid JSON" in str(info.value) and TOKEN not in str(info.value)


def test_yaml_file_errors(yaml_file, tmp_path):
    with pytest.raises(ConfigError, match="unknown field 'colour'"):
        load_serve_config({}, yaml_file({"colour": "blue"}), env={})
    with pytest.raises(ConfigError, match="use 'precision' instead"):
        load_serve_config({}, yaml_file({"dtype": "bf16"}), env={})
    with pytest.raises(ConfigError, match="not supported yet"):
        load_serve_config({}, yaml_file({"replicas": {"min": 1, "max": 2}}), env={})
    with pytest.raises(ConfigError, match=r"unknown field speculative.depth .*speculative.num_steps"):
        load_serve_config({}, yaml_file({"speculative": {"depth": 3}}), env={})
    with pytest.raises(ConfigError, match="mapping"):
        load_serve_config({}, yaml_file("- a\n- b\n"), env={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_serve_config({}, tmp_path / "missing.yaml", env={})
    assert load_serve_config({}, yaml_file(""), env={})[0] == ServeConfig()


# ------------------------------------------------------------------ backends: what each can honour


@pytest.mark.parametrize("cli, env, field, source", [
    ({}, {"DEPLOYMENT_CONFIG_JSON": '{"quantization": "awq"}'}, "quantization", "DEPLOYMENT_CONFIG_JSON"),
    ({"kv_cache_dtype": "int8"}, {}, "kv_cache_dtype", "cli"),
    ({}, {"SPECULATIVE_ALGORITHM": "EAGLE3"}, "speculative", "env SPECULATIVE_ALGORITHM"),
    ({}, {"H100_ONLY": "true"}, "h100_only", "env H100_ONLY"),
    ({"pd": "on"}, {}, "pd", "cli"),
    ({}, {"FLEETSERVE_MEM_FRACTION_STATIC": "0.8"}, "mem_fraction_static", "env FLEETSERVE_MEM_FRACTION_STATIC"),
    ({"engine_port": 31000}, {}, "engine_port", "cli"),
])
def test_native_backend_rejects_gpu_backend_settings(cli, env, field, source):
    with pytest.raises(ConfigError) as info:
        load_serve_config(cli, env=env)
    message = str(info.value)
    assert field in message and source in message and "sglang and vllm" in message and "--backend" in message
    assert (info.value.field, info.value.source) == (field, source)
    load_serve_config({**cli, "backend": "sglang"}, env=env)  # the same setting is fine with a GPU backend


def test_native_backend_accepts_ngram_and_eagle_speculation():
    from fleetserve.server.app import speculative_config

    cfg, _ = load_serve_config({"speculative": "ngram", "speculative_num_draft_tokens": 5}, env={})
    assert speculative_config(cfg) == {"speculative_method": "ngram", "num_speculative_tokens": 5}
    with pytest.raises(ConfigError, match="needs --speculative-draft-model-path"):
        load_serve_config({"speculative": "eagle"}, env={})
    cfg, _ = load_serve_config({"speculative": "eagle", "speculative_num_steps": 3,
                                "speculative_draft_model_path": "/tmp"}, env={})
    assert speculative_config(cfg) == {"speculative_method": "eagle", "num_speculative_tokens": 3,
                                       "speculative_draft_path": "/tmp"}


def test_native_backend_rejects_fp8_and_accepts_what_it_honours():
    with pytest.raises(ConfigError, match="precision 'fp8' .*needs --backend sglang or vllm"):
        load_serve_config({"precision": "float8"}, env={})
    # seed 001's TP_SIZE=1, ENABLE_PD_DEFAULTS=false and kv_cache_dtype auto ask nothing of the native engine
    cfg, _ = load_serve_config({}, env={"TP_SIZE": "1", "ENABLE_PD_DEFAULTS": "false", "FLEETSERVE_KV_CACHE_DTYPE": "auto"})
    assert (cfg.backend, cfg.tp_size, cfg.pd, cfg.kv_cache_dtype) == ("native", 1, "off", "auto")
    # tensor parallelism is the native engine's too (one process per rank); the model is checked at load
    assert load_serve_config({}, env={"TP_SIZE": "2"})[0].tp_size == 2
    assert load_serve_config({"precision": "fp8", "backend": "vllm"}, env={})[0].precision == "fp8"


@pytest.mark.parametrize("cli, yml, field, source", [
    ({"max_batch_tokens": 512}, None, "max_batch_tokens", "cli"),
    ({"device": "cpu"}, None, "device", "cli"),
    ({}, {"block_size": 32}, "block_size", "yaml"),
    ({}, {"enable_prefix_caching": False}, "enable_prefix_caching", "yaml"),
    ({"kv_cache_memory": "2GiB"}, None, "kv_cache_memory", "cli"),
    ({"max_new_tokens": 64}, None, "max_new_tokens", "cli"),
])
def test_gpu_backends_reject_native_engine_settings(cli, yml, field, source, yaml_file):
    path = yaml_file(yml) if yml is not None else None
    with pytest.raises(ConfigError) as info:
        load_serve_config({**cli, "backend": "sglang", "model": "org/m"}, path, env={})
    assert field in str(info.value) and "native engine" in str(info.value) and "sglang backend" in str(info.value)
    assert info.value.field == field and info.value.source.startswith(source)


def test_gpu_backends_accept_shared_settings():
    cfg, sources = load_serve_config({"backend": "vllm", "model": "org/m", "device": "cuda", "max_queue_len": 9},
                                     env={"MAX_TOTAL_TOKENS": "65536", "FLEETSERVE_API_KEY": "key-12345678",
                                          "FLEETSERVE_CORS_ORIGINS": "https://a.example"})
    assert (cfg.device, cfg.max_queue_len, cfg.kv_cache_tokens, sources["kv_cache_tokens"]) == \
        ("cuda", 9, 65536, "env MAX_TOTAL_TOKENS")


def test_nested_speculative_and_pd_objects_in_files(yaml_file):
    doc = {"backend": "sglang", "speculative": {"algorithm": "EAGLE", "num_steps": 3, "draft_model_path": "org/d"},
           "pd": {"enabled": False, "bootstrap_port": 9100, "ib_device": "mlx5_0"}}
    cfg, sources = load_serve_config({}, yaml_file(doc), env={})
    assert (cfg.speculative, cfg.speculative_num_steps, cfg.speculative_draft_model_path) == ("eagle", 3, "org/d")
    assert (cfg.pd, cfg.pd_bootstrap_port, cfg.pd_ib_device) == ("off", 9100, "mlx5_0")
    assert sources["speculative_num_steps"].startswith("yaml")
    env = {"DEPLOYMENT_CONFIG_JSON": json.dumps({**doc, "pd": {"enabled": True}}), "DISAGG_BOOTSTRAP_PORT": "9200"}
    cfg, sources = load_serve_config({}, env=env)
    assert (cfg.pd, cfg.pd_bootstrap_port, sources["pd_bootstrap_port"]) == ("on", 9200, "env DISAGG_BOOTSTRAP_PORT")


def test_enable_pd_defaults_values():
    assert load_serve_config({"backend": "sglang"}, env={"ENABLE_PD_DEFAULTS": "TRUE"})[0].pd == "auto"
    with pytest.raises(ConfigError, match="ENABLE_PD_DEFAULTS='sometimes': expected true"):
        load_serve_config({"backend": "sglang"}, env={"ENABLE_PD_DEFAULTS": "sometimes"})


def test_every_planner_seed_name_is_a_serve_seed_name():
    """`fleetserve plan` and `fleetserve serve` read the same seed env names into the same settings."""
    from fleetserve.config import SEED_ENV
    from fleetserve.planner.serve import RENAMED
    from fleetserve.planner.spec import SEED_ENV as PLAN_SEED_ENV

    to_plan = {name: RENAMED.get(field, field) for name, field in SEED_ENV.items()}
    for name, field in PLAN_SEED_ENV.items():
        assert to_plan.get(name) == field, name


# ------------------------------------------------------------------ validation messages


@pytest.mark.parametrize(
    "cli, env, yml, field, source, allowed",
    [
        ({}, {"PORT": "70000"}, None, "port", "env PORT", "1 to 65535"),
        ({"port": 0}, {}, None, "port", "cli", "1 to 65535"),
        ({}, {}, {"block_size": 24}, "block_size", "yaml", "8, 16, 32, 64, 128"),
        ({}, {}, {"port": True}, "port", "yaml", "1 to 65535"),
        ({"log_level": "verbose"}, {}, None, "log_level", "cli", "debug, info, warning, error"),
        ({}, {"FLEETSERVE_MAX_BATCH_TOKENS": "lots"}, None, "max_batch_tokens", "env FLEETSERVE_MAX_BATCH_TOKENS",
         "positive integer"),
        ({}, {"DEPLOYMENT_CONFIG_JSON": '{"max_running_seqs": 0}'}, None, "max_running_seqs",
         "DEPLOYMENT_CONFIG_JSON", "positive integer"),
        ({}, {"MAX_TOTAL_TOKENS": "-5"}, None, "kv_cache_tokens", "env MAX_TOTAL_TOKENS", "positive integer"),
        ({"precision": "fp8"}, {}, None, "precision", "cli", "auto, fp32, bf16, fp16"),
        ({"device": "tpu"}, {}, None, "device", "cli", "auto, cpu, cuda, mps"),
    ],
)
def test_validation_message_names_field_source_and_allowed(cli, env, yml, field, source, allowed, yaml_file):
    path = yaml_file(yml) if yml is not None else None
    with pytest.raises(ConfigError) as info:
        load_serve_config(cli, path, env=env)
    message = str(info.value)
    assert field in message and source in message and allowed in message, message
    assert info.value.field == field and info.value.source.startswith(source)


def test_case_and_alias_normalisation():
    cfg, _ = load_serve_config({"log_level": "WARN", "precision": "BFloat16", "device": "CPU"}, env={})
    assert (cfg.log_level, cfg.precision, cfg.device) == ("warning", "bf16", "cpu")


# ------------------------------------------------------------------ secrets in output


def test_secret_redacted_in_dict_and_table():
    cfg, sources = load_serve_config({}, env={"HF_TOKEN": TOKEN})
    assert config_as_dict(cfg)["hf_token"] == "***"
    assert config_as_dict(cfg, redact=False)["hf_token"] == TOKEN
    assert config_as_dict(ServeConfig())["hf_token"] is None
    assert TOKEN not in json.dumps(config_as_dict(cfg)) and TOKEN not in repr(cfg)
    buf = io.StringIO()
    Console(file=buf, width=200).print(render_config(cfg, sources))
    text = buf.getvalue()
    assert "***" in text and "env HF_TOKEN" in text
    assert TOKEN not in text and TOKEN[:12] not in text


# ------------------------------------------------------------------ device and dtype


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_resolve_device_auto_and_cpu(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_resolve_device_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto").type == "mps"


@pytest.mark.parametrize("name", ["cuda", "mps"])
def test_resolve_device_absent_says_what_was_asked_and_what_exists(name, no_gpu):
    with pytest.raises(ValueError) as info:
        resolve_device(name)
    message = str(info.value)
    assert f"'{name}' was requested" in message and "cpu" in message


def test_resolve_dtype(monkeypatch):
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", "mps") == torch.float16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("fp16", "cpu") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda") == torch.float16
    with pytest.raises(ValueError, match="allowed: auto, fp32, bf16, fp16"):
        resolve_dtype("fp8", "cpu")


# ------------------------------------------------------------------ logging and redaction


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_logs_have_fields_and_extras(capsys, restore_logging):
    logs.setup_logging("INFO", json_logs=True)
    logging.getLogger("fleetserve.test").info("hello %s", "world", extra={"request_id": "req-1"})
    logging.getLogger("fleetserve.test").debug("hidden")
    (entry,) = _json_lines(capsys.readouterr().err)
    assert entry["msg"] == "hello world" and entry["level"] == "info" and entry["logger"] == "fleetserve.test"
    assert entry["request_id"] == "req-1" and entry["ts"].endswith("+00:00")


def test_json_is_the_default_when_stderr_is_not_a_tty(capsys, restore_logging):
    logs.setup_logging("debug")
    logs.setup_logging("debug")  # idempotent: still one handler
    logging.getLogger("x").debug("once")
    assert [e["msg"] for e in _json_lines(capsys.readouterr().err)] == ["once"]


def test_request_id_from_context(capsys, restore_logging):
    logs.setup_logging("info", json_logs=True)
    token = logs.request_id_var.set("ctx-42")
    try:
        logging.getLogger("x").info("in request")
    finally:
        logs.request_id_var.reset(token)
    assert _json_lines(capsys.readouterr().err)[0]["request_id"] == "ctx-42"


def test_redaction_of_registered_and_token_shaped_secrets(capsys, restore_logging, tmp_path):
    log_file = tmp_path / "logs" / "worker.jsonl"
    logs.setup_logging("info", json_logs=True, log_file=log_file)
    logs.register_secret("s3cr3t-admin-key")
    log = logging.getLogger("fleetserve.test")
    log.info("token is %s", TOKEN)
    log.info(f"header Authorization: Bearer {TOKEN[3:]} sent")
    log.info("admin key %s in %r", "s3cr3t-admin-key", {"key": "s3cr3t-admin-key"})
    log.info("upstream said", extra={"detail": f"bad token {TOKEN}"})
    try:
        raise RuntimeError(f"auth failed for {TOKEN}")
    except RuntimeError:
        log.exception("boom")
    out = capsys.readouterr().err
    for text in (out, log_file.read_text()):
        assert TOKEN not in text and TOKEN[3:] not in text and "s3cr3t-admin-key" not in text
        entries = _json_lines(text)
        assert entries[0]["msg"] == "token is ***"
        assert entries[1]["msg"] == "header Authorization: Bearer *** sent"
        assert entries[2]["msg"] == "admin key *** in {'key': '***'}"
        assert entries[3]["detail"] == "bad token ***"
        assert "auth failed for ***" in entries[4]["exc"]


def test_redaction_in_human_format(restore_logging, monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)
    logs.setup_logging("info", json_logs=False)
    logging.getLogger("x").warning("using %s", TOKEN)
    assert TOKEN not in buf.getvalue() and "***" in buf.getvalue()


def test_unknown_level_is_rejected(restore_logging):
    with pytest.raises(ValueError, match="allowed: debug, info, warning, error"):
        logs.setup_logging("verbose")
