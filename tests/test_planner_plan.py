"""The planner on every seed case, with exact layouts: PD splits, TP replacement, guard, precision, EAGLE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleetserve.cli import app
from fleetserve.planner.build import build_plan, hardware_for
from fleetserve.planner.hardware import Hardware, synthetic_hardware
from fleetserve.planner.model_info import load_model_info, model_info_from_config
from fleetserve.planner.plan import make_plan, tp_problem, valid_tps
from fleetserve.planner.spec import PlanConfigError, load_plan_spec
from fleetserve.planner.types import PlanError, PlanSpec

CONFIGS = Path(__file__).parent / "fixtures" / "model_configs"
QWEN7B = str(CONFIGS / "Qwen2.5-7B-Instruct")
LLAMA8B = str(CONFIGS / "Llama-3.1-8B-Instruct")
LLAMA70B = str(CONFIGS / "Llama-3.1-70B-Instruct")
DRAFT = "yuhuili/EAGLE-LLaMA3.1-Instruct-8B"

# A model every seed TP (1, 2, 3) can split: 48 heads, 6 KV heads, MLP 18432.
DIVISIBLE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 6144,
             "intermediate_size": 18432, "num_attention_heads": 48, "num_key_value_heads": 6,
             "num_hidden_layers": 32, "vocab_size": 64000, "max_position_embeddings": 16384,
             "torch_dtype": "bfloat16"}


def divisible_model():
    return model_info_from_config(DIVISIBLE, "test/Divisible-7B", "test")


def make(model, gpu: str | None, count: int = 0, **spec):
    info = model if not isinstance(model, str) else load_model_info(model)
    hw = synthetic_hardware(gpu, count) if gpu else Hardware()
    return make_plan(PlanSpec(model=info.name, backend=spec.pop("backend", "sglang"), **spec), hw, info)


def layout(p):
    return [(q.role, q.gpus, q.tp_size, q.port, q.env.get("CUDA_VISIBLE_DEVICES"), q.bootstrap_port)
            for q in p.processes]


def flag(argv: list[str], name: str):
    return argv[argv.index(name) + 1] if name in argv else None


def decisions(p) -> dict[str, str]:
    return {d.setting: f"{d.value} | {d.reason}" for d in p.decisions}


# ---------------------------------------------------------------- seed 002's PD splits


def test_eight_h100_seed_split_exactly():
    p = make(divisible_model(), "H100", 8)
    assert p.mode == "pd" and p.pd_bootstrap_port == 8998 and p.entry_url == "http://127.0.0.1:30000"
    assert layout(p) == [
        ("router", [], None, 30000, None, None),
        ("prefill", [0, 1], 2, 30001, "0,1", 8998),
        ("decode", [2, 3, 4], 3, 30002, "2,3,4", None),
        ("decode", [5, 6, 7], 3, 30003, "5,6,7", None),
    ]
    router = p.processes[0].argv
    assert router[:4] == ["python3", "-m", "sglang_router.launch_router", "--pd-disaggregation"]
    assert router[router.index("--prefill"):router.index("--prefill") + 3] == [
        "--prefill", "http://127.0.0.1:30001", "8998"]
    assert [router[i + 1] for i, a in enumerate(router) if a == "--decode"] == [
        "http://127.0.0.1:30002", "http://127.0.0.1:30003"]
    assert flag(router, "--decode-policy") == "round_robin"
    prefill, d0, d1 = p.processes[1:]
    assert flag(prefill.argv, "--disaggregation-mode") == "prefill"
    assert flag(prefill.argv, "--disaggregation-bootstrap-port") == "8998"
    assert flag(d0.argv, "--disaggregation-mode") == "decode" and "--disaggregation-bootstrap-port" not in d0.argv
    assert flag(d1.argv, "--tp-size") == "3"
    d = decisions(p)
    assert "seed 002's split for 8 H100s: decode 2 x TP3 on GPUs 2-4, 5-7" in d["decode_layout"]
    assert "all 8 GPUs are H100" in d["pd"] and not p.warnings


def test_four_h100_seed_split_exactly():
    p = make(divisible_model(), "H100", 4)
    assert layout(p) == [
        ("router", [], None, 30000, None, None),
        ("prefill", [0], 1, 30001, "0", 8998),
        ("decode", [1, 2, 3], 3, 30002, "1,2,3", None),
    ]
    assert "--decode-policy" not in p.processes[0].argv  # one decode server


def test_two_h100_seed_split_exactly():
    p = make(LLAMA8B, "H100", 2)
    assert layout(p) == [
        ("router", [], None, 30000, None, None),
        ("prefill", [0], 1, 30001, "0", 8998),
        ("decode", [1], 1, 30002, "1", None),
    ]


def test_qwen7b_tp3_is_replaced_by_three_tp2_decode_replicas():
    p = make(QWEN7B, "H100", 8)
    assert layout(p) == [
        ("router", [], None, 30000, None, None),
        ("prefill", [0, 1], 2, 30001, "0,1", 8998),
        ("decode", [2, 3], 2, 30002, "2,3", None),
        ("decode", [4, 5], 2, 30003, "4,5", None),
        ("decode", [6, 7], 2, 30004, "6,7", None),
    ]
    d = decisions(p)["decode_layout"]
    assert "seed 002's decode 2 x TP3 on GPUs 2-7 replaced by 3 x TP2 on GPUs 2-3, 4-5, 6-7" in d
    assert "28 attention heads are not divisible by 3" in d
    assert any("replaced by 3 x TP2" in w for w in p.warnings)  # the plan says so, loudly
    assert [p.processes[0].argv[i + 1] for i, a in enumerate(p.processes[0].argv) if a == "--decode"] == [
        "http://127.0.0.1:30002", "http://127.0.0.1:30003", "http://127.0.0.1:30004"]


def test_qwen7b_on_four_h100_decodes_on_three_tp1_replicas():
    p = make(QWEN7B, "H100", 4)
    assert [(q.role, q.gpus, q.tp_size) for q in p.processes] == [
        ("router", [], None), ("prefill", [0], 1), ("decode", [1], 1), ("decode", [2], 1), ("decode", [3], 1)]


def test_invalid_prefill_tp_becomes_two_prefill_servers_with_their_own_bootstrap_ports():
    p = make("default", "H100", 8, pd_bootstrap_port=9000)  # SmolLM2-135M: 9 heads, TP2 impossible, TP3 fine
    assert layout(p) == [
        ("router", [], None, 30000, None, None),
        ("prefill", [0], 1, 30001, "0", 9000),
        ("prefill", [1], 1, 30002, "1", 9001),
        ("decode", [2, 3, 4], 3, 30003, "2,3,4", None),
        ("decode", [5, 6, 7], 3, 30004, "5,6,7", None),
    ]
    router = p.processes[0].argv
    assert [router[i + 1:i + 3] for i, a in enumerate(router) if a == "--prefill"] == [
        ["http://127.0.0.1:30001", "9000"], ["http://127.0.0.1:30002", "9001"]]
    assert "9 attention heads are not divisible by 2" in decisions(p)["prefill_layout"]


def test_pd_falls_back_to_unified_when_a_role_cannot_fit():
    p = make(LLAMA70B, "H100", 4)  # prefill TP1 cannot hold 70B even in FP8
    assert p.mode == "unified" and [(q.role, q.gpus, q.tp_size) for q in p.processes] == [
        ("unified", [0, 1, 2, 3], 4)]
    d = decisions(p)
    assert d["pd"].startswith("off | seed 002's prefill layout on GPU 0 is impossible")
    assert "does not fit" in d["pd"] and "falling back to one unified engine" in d["pd"]


@pytest.mark.parametrize("env, reason", [
    ({"TP_SIZE": "2"}, "explicit tp_size disables the automatic PD split"),
    ({"ENABLE_PD_DEFAULTS": "false"}, "PD disaggregation disabled (from env ENABLE_PD_DEFAULTS)"),
])
def test_explicit_tp_or_env_disables_pd(env, reason):
    spec, sources, _ = load_plan_spec({"model": QWEN7B, "backend": "sglang"}, env=env)
    p = make_plan(spec, synthetic_hardware("H100", 8), load_model_info(QWEN7B), sources)
    assert p.mode == "unified" and p.pd_bootstrap_port is None
    (proc,) = p.processes
    expected_tp = 2 if "TP_SIZE" in env else 4  # auto: the largest TP Qwen2.5-7B allows on 8 GPUs
    assert (proc.role, proc.gpus, proc.tp_size, proc.port) == ("unified", list(range(expected_tp)), expected_tp, 30000)
    assert reason in decisions(p)["mode"]
    assert "--disaggregation-mode" not in proc.argv
    assert any("stay unused" in w for w in p.warnings)
    if "TP_SIZE" in env:
        assert decisions(p)["tp_size"] == "2 | explicit (from env TP_SIZE)"


@pytest.mark.parametrize("count", [1, 3, 5, 6])
def test_pd_only_for_two_four_or_eight_h100(count):
    p = make(LLAMA8B, "H100", count)
    assert p.mode == "unified" and len(p.processes) == 1


def test_pd_needs_all_h100_and_the_sglang_backend():
    assert make(LLAMA8B, "H200", 8).mode == "unified"
    assert "automatic PD needs all GPUs to be H100" in decisions(make(LLAMA8B, "A100", 8))["mode"]
    p = make(LLAMA8B, "H100", 8, backend="vllm")
    assert p.mode == "unified" and "sglang backend only" in decisions(p)["mode"]
    with pytest.raises(PlanError, match="PD disaggregation is planned for the sglang backend only"):
        make(LLAMA8B, "H100", 8, backend="vllm", pd="on")
    with pytest.raises(PlanError, match="pd=on and an explicit tp_size conflict"):
        make(LLAMA8B, "H100", 8, pd="on", tp_size=2)
    forced = make(LLAMA8B, "A100", 2, pd="on")
    assert forced.mode == "pd" and any("tuned for H100s" in w for w in forced.warnings)


def test_bootstrap_port_and_ib_devices_from_seed_env():
    env = {"DISAGG_BOOTSTRAP_PORT": "9100", "DISAGG_IB_DEVICE": "mlx5_0,mlx5_1"}
    spec, sources, _ = load_plan_spec({"model": LLAMA8B, "backend": "sglang"}, env=env)
    p = make_plan(spec, synthetic_hardware("H100", 2), load_model_info(LLAMA8B), sources)
    prefill, decode = p.by_role("prefill")[0], p.by_role("decode")[0]
    assert p.pd_bootstrap_port == 9100 and prefill.bootstrap_port == 9100
    assert flag(prefill.argv, "--disaggregation-bootstrap-port") == "9100"
    assert flag(prefill.argv, "--disaggregation-ib-device") == "mlx5_0,mlx5_1"
    assert flag(decode.argv, "--disaggregation-ib-device") == "mlx5_0,mlx5_1"
    assert "9100 | explicit (from env DISAGG_BOOTSTRAP_PORT)" == decisions(p)["pd_bootstrap_port"]


# ---------------------------------------------------------------- H100 guard and precision


def test_non_h100_without_the_guard_plans_bf16():
    p = make(LLAMA8B, "A100", 8)
    (proc,) = p.processes
    assert (proc.tp_size, proc.gpus) == (8, list(range(8)))
    assert flag(proc.argv, "--dtype") == "bfloat16" and "--quantization" not in proc.argv
    assert "--kv-cache-dtype" not in proc.argv
    assert decisions(p)["precision"].startswith("bf16 | auto: bf16 because the FP8 default is for H100/H200")


@pytest.mark.parametrize("how", ["spec", "env", "json"])
def test_the_guard_refuses_a100_naming_what_it_found(how):
    env, cli = {}, {"model": LLAMA8B, "backend": "sglang", "gpu_type": "A100", "gpu_count": 8}
    if how == "spec":
        cli["h100_only"] = True
    elif how == "env":
        env["H100_ONLY"] = "true"
    else:
        env["DEPLOYMENT_CONFIG_JSON"] = json.dumps({"h100_only": True})
    spec, sources, _ = load_plan_spec(cli, env=env)
    with pytest.raises(PlanError) as exc:
        build_plan(spec, sources)
    msg = str(exc.value)
    assert "h100_only is set" in msg and "8 x NVIDIA A100-SXM4-80GB (80 GiB, sm80)" in msg
    assert "NVIDIA A100-SXM4-80GB is not H100" in msg


def test_the_guard_on_cpu_and_on_h100():
    with pytest.raises(PlanError, match=r"this machine has no GPU \(CPU only\)"):
        make(LLAMA8B, None, h100_only=True, backend="native")
    p = make(LLAMA8B, "H100", 2, h100_only=True)
    assert "H100 guard passed: all 2 GPU(s) are H100" in decisions(p)["h100_only"]


def test_auto_precision_on_h100_is_fp8_weights_and_fp8_kv():
    p = make(LLAMA8B, "H100", 1)
    argv = p.processes[0].argv
    assert flag(argv, "--quantization") == "fp8" and flag(argv, "--kv-cache-dtype") == "fp8_e5m2"
    assert "--dtype" not in argv and p.settings.precision == "fp8"


def test_explicit_precision_and_kv_dtype_win():
    argv = make(LLAMA8B, "H100", 1, precision="bf16").processes[0].argv
    assert flag(argv, "--dtype") == "bfloat16" and "--quantization" not in argv and "--kv-cache-dtype" not in argv
    argv = make(LLAMA8B, "H100", 1, kv_cache_dtype="fp8_e4m3").processes[0].argv
    assert flag(argv, "--quantization") == "fp8" and flag(argv, "--kv-cache-dtype") == "fp8_e4m3"
    argv = make(LLAMA8B, "H100", 1, quantization="awq").processes[0].argv
    assert flag(argv, "--quantization") == "awq" and "--kv-cache-dtype" not in argv
    p = make(LLAMA8B, "A100", 1, precision="fp8")
    assert flag(p.processes[0].argv, "--quantization") == "fp8"
    assert any("no FP8 tensor cores" in w for w in p.warnings)
    assert flag(make(str(CONFIGS / "Qwen2.5-0.5B-Instruct"), "T4", 1).processes[0].argv, "--dtype") == "float16"


def test_auto_use_fp8_on_h100_false_from_deployment_json():
    env = {"DEPLOYMENT_CONFIG_JSON": json.dumps({"model_id": LLAMA8B, "auto_use_fp8_on_h100": False})}
    spec, sources, _ = load_plan_spec({"backend": "sglang", "gpu_type": "H100"}, env=env)
    p = build_plan(spec, sources)
    assert flag(p.processes[0].argv, "--dtype") == "bfloat16" and "--quantization" not in p.processes[0].argv


# ---------------------------------------------------------------- TP and memory


def test_tp_rules():
    qwen = load_model_info(QWEN7B)  # 28 heads, 4 KV heads, MLP 18944
    assert valid_tps(qwen, 8) == [1, 2, 4]
    assert "28 attention heads are not divisible by 3" in tp_problem(qwen, 3)
    assert tp_problem(divisible_model(), 12) is None  # 6 KV heads divide 12: replicated, as SGLang allows
    with pytest.raises(PlanError, match=r"tp_size 3 is not possible for .*valid TP sizes: 1, 2, 4"):
        make(QWEN7B, "H100", 4, tp_size=3)
    with pytest.raises(PlanError, match="tp_size 8 needs 8 GPUs; this machine has 4 x NVIDIA H100"):
        make(LLAMA8B, "H100", 4, tp_size=8)


def test_memory_rejections_say_why():
    with pytest.raises(PlanError) as exc:
        make(LLAMA70B, "H100", 1, precision="bf16")
    msg = str(exc.value)
    assert "does not fit with TP 1 on 1 x NVIDIA H100" in msg and "weights 131.4 GiB/GPU" in msg
    assert "the weights alone do not fit" in msg
    with pytest.raises(PlanError, match="about [0-9]+ tokens fit"):
        make(LLAMA70B, "L4", 4, precision="fp8")  # weights fit in 4 x 24 GB, 131k tokens of KV do not
    p = make(LLAMA70B, "L4", 4, precision="fp8", max_model_len=8192)
    assert p.processes[0].tp_size == 4 and p.memory[0].fits


def test_max_model_len_limits():
    with pytest.raises(PlanError, match=r"exceeds the context length of .* \(32768 tokens\)"):
        make(QWEN7B, "H100", 1, max_model_len=65536)
    p = make(QWEN7B, "H100", 1, max_model_len=8192, max_total_tokens=4096)
    assert flag(p.processes[0].argv, "--context-length") == "8192"
    assert flag(p.processes[0].argv, "--max-total-tokens") == "4096"
    assert any("smaller than max_model_len" in w for w in p.warnings)


def test_backends_need_gpus():
    with pytest.raises(PlanError, match="the sglang backend needs NVIDIA GPUs .* --backend native"):
        make(LLAMA8B, None, backend="sglang")


# ---------------------------------------------------------------- speculative decoding


def test_eagle_with_seed_env_names_on_both_pd_roles():
    env = {"SPECULATIVE_ALGORITHM": "EAGLE", "SPECULATIVE_NUM_STEPS": "2", "SPECULATIVE_EAGLE_TOPK": "6",
           "SPECULATIVE_NUM_DRAFT_TOKENS": "10", "SPECULATIVE_DRAFT_MODEL_PATH": DRAFT,
           "SPECULATIVE_TOKEN_MAP": "/maps/token_map.pt", "SPECULATIVE_ATTENTION_MODE": "prefill"}
    spec, sources, _ = load_plan_spec({"model": LLAMA8B, "backend": "sglang"}, env=env)
    p = make_plan(spec, synthetic_hardware("H100", 2), load_model_info(LLAMA8B), sources)
    for proc in p.by_role("prefill") + p.by_role("decode"):
        a = proc.argv
        assert flag(a, "--speculative-algorithm") == "EAGLE"
        assert (flag(a, "--speculative-num-steps"), flag(a, "--speculative-eagle-topk"),
                flag(a, "--speculative-num-draft-tokens")) == ("2", "6", "10")
        assert flag(a, "--speculative-draft-model-path") == DRAFT
        assert flag(a, "--speculative-token-map") == "/maps/token_map.pt"
        assert flag(a, "--speculative-attention-mode") == "prefill"
    assert "--speculative-algorithm" not in p.processes[0].argv  # not the router
    assert decisions(p)["speculative_num_steps"] == "2 | explicit (from env SPECULATIVE_NUM_STEPS)"


def test_eagle3_defaults_off_and_errors():
    p = make(LLAMA8B, "H100", 1, speculative="eagle3", speculative_draft_model_path=DRAFT)
    a = p.processes[0].argv
    assert flag(a, "--speculative-algorithm") == "EAGLE3"
    assert (flag(a, "--speculative-num-steps"), flag(a, "--speculative-eagle-topk"),
            flag(a, "--speculative-num-draft-tokens")) == ("2", "6", "10")
    assert "seed 002's recommended EAGLE starting point" in decisions(p)["speculative_eagle_topk"]
    off = make(LLAMA8B, "H100", 1)
    assert not any(x.startswith("--speculative") for x in off.processes[0].argv)
    assert off.to_dict()["speculative"] is None
    with pytest.raises(PlanError, match="speculative eagle needs a draft model: set --speculative-draft-model-path"):
        make(LLAMA8B, "H100", 1, speculative="EAGLE")
    ngram = make(LLAMA8B, "H100", 1, speculative="ngram")
    assert flag(ngram.processes[0].argv, "--speculative-algorithm") == "NGRAM"
    assert "--speculative-draft-model-path" not in ngram.processes[0].argv


def test_eagle_draft_counts_in_memory():
    base = make(LLAMA8B, "H100", 1).memory[0].weights_gib
    with_draft = make(LLAMA8B, "H100", 1, speculative="eagle", speculative_draft_model_path=DRAFT).memory[0]
    assert with_draft.weights_gib > base + 1.0


# ---------------------------------------------------------------- native and vLLM, seed JSON keys


def test_native_plan_is_the_fleetserve_worker():
    p = make("default", None, backend="native")
    (proc,) = p.processes
    assert proc.argv[:5] == ["python3", "-m", "fleetserve", "serve", "--model"]
    assert flag(proc.argv, "--device") == "cpu" and flag(proc.argv, "--precision") == "fp32"
    assert flag(proc.argv, "--port") == "8000" and proc.env == {}
    gpu = make(LLAMA8B, "H100", 2, backend="native")
    assert flag(gpu.processes[0].argv, "--precision") == "bf16" and gpu.processes[0].env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert any("native engine uses one GPU" in w for w in gpu.warnings)
    tp2 = make(LLAMA8B, "H100", 2, backend="native", tp_size=2)
    (proc,) = tp2.processes
    assert (flag(proc.argv, "--tp-size"), proc.env, proc.gpus, proc.tp_size) == ("2", {"CUDA_VISIBLE_DEVICES": "0,1"},
                                                                                [0, 1], 2)
    assert not tp2.warnings or not any("stay unused" in w for w in tp2.warnings)
    cpu_tp = make("default", None, backend="native", tp_size=3)  # SmolLM2: 9 query / 3 KV heads
    assert flag(cpu_tp.processes[0].argv, "--tp-size") == "3" and cpu_tp.processes[0].env == {}
    with pytest.raises(PlanError, match="its 9 attention heads are not divisible by 2"):
        make("default", None, backend="native", tp_size=2)
    with pytest.raises(PlanError, match=r"tp_size 3 is not possible .*valid TP sizes: 1, 2, 4, 8"):
        make(LLAMA8B, "H100", 4, backend="native", tp_size=3)
    for bad, msg in (({"tp_size": 4}, "tp_size 4 needs 4 GPUs"),
                     ({"speculative": "eagle3"}, "eagle3 is not available with the native engine"),
                     ({"precision": "fp8"}, "fp8 is not available with the native engine")):
        with pytest.raises(PlanError, match=msg):
            make(LLAMA8B, "H100", 2, backend="native", **bad)
    spec = make(LLAMA8B, "H100", 1, backend="native", speculative="ngram", speculative_num_draft_tokens=5)
    argv = spec.processes[0].argv
    assert flag(argv, "--speculative") == "ngram" and flag(argv, "--speculative-num-draft-tokens") == "5"


def test_seed_json_and_env_keys_reach_the_command_line():
    env = {"DEPLOYMENT_CONFIG_JSON": json.dumps({
        "model_id": QWEN7B, "tp_size": 1, "mem_fraction_static": 0.8, "schedule_conservativeness": 0.7,
        "max_queued_requests": 128, "enable_metrics": False, "enable_p2p_check": True, "enable_torch_compile": True,
        "max_total_tokens": 65536, "hf_token": "hf_dont_print_me", "kv_cache_dtype": "fp8_e4m3"}),
        "LOG_LEVEL": "DEBUG", "PORT": "9000", "HATHORA_DEFAULT_PORT": "7000", "MAX_TOTAL_TOKENS": "50000"}
    spec, sources, token = load_plan_spec({"backend": "sglang", "gpu_type": "H100", "gpu_count": 2}, env=env)
    assert token == "hf_dont_print_me" and spec.port == 9000 and sources["port"] == "env PORT"
    assert spec.max_total_tokens == 50000 and sources["max_total_tokens"] == "env MAX_TOTAL_TOKENS"
    p = build_plan(spec, sources)
    a = p.processes[0].argv
    assert p.mode == "unified" and flag(a, "--tp-size") == "1"
    assert (flag(a, "--mem-fraction-static"), flag(a, "--schedule-conservativeness"),
            flag(a, "--max-queued-requests"), flag(a, "--max-total-tokens")) == ("0.8", "0.7", "128", "50000")
    assert "--enable-metrics" not in a and "--enable-p2p-check" in a and "--enable-torch-compile" in a
    assert flag(a, "--log-level") == "debug" and flag(a, "--kv-cache-dtype") == "fp8_e4m3"
    assert "hf_dont_print_me" not in json.dumps(p.to_dict())


def test_precedence_cli_over_fleetserve_env_over_seed_env_over_json_over_yaml(tmp_path):
    yaml_file = tmp_path / "plan.yaml"
    yaml_file.write_text("model: m0\ntp_size: 1\nspeculative: {algorithm: eagle, num_steps: 3}\n"
                         "pd: {enabled: false, bootstrap_port: 9999}\ngpu: {type: H100, count: 4}\n")
    env = {"DEPLOYMENT_CONFIG_JSON": '{"tp_size": 2, "model_path": "m1"}', "TP_SIZE": "4", "FLEETSERVE_TP_SIZE": "8"}
    spec, sources, _ = load_plan_spec({}, yaml_file, env)
    assert (spec.tp_size, sources["tp_size"]) == (8, "env FLEETSERVE_TP_SIZE")
    assert (spec.model, sources["model"]) == ("m1", "DEPLOYMENT_CONFIG_JSON")
    assert (spec.speculative, spec.speculative_num_steps, spec.pd, spec.pd_bootstrap_port) == ("eagle", 3, "off", 9999)
    assert (spec.gpu_type, spec.gpu_count) == ("H100", 4)
    spec, sources, _ = load_plan_spec({"tp_size": 2}, yaml_file, env)
    assert (spec.tp_size, sources["tp_size"]) == (2, "cli")
    spec, _, _ = load_plan_spec({}, None, {"ENABLE_PD_DEFAULTS": "true"})
    assert spec.pd == "auto"


@pytest.mark.parametrize("env, message", [
    ({"DEPLOYMENT_CONFIG_JSON": '{"tp_sise": 2}'}, "unknown field 'tp_sise' (from DEPLOYMENT_CONFIG_JSON)"),
    ({"DEPLOYMENT_CONFIG_JSON": "{nope"}, "DEPLOYMENT_CONFIG_JSON is not valid JSON"),
    ({"TP_SIZE": "two"}, "invalid tp_size 'two' (from env TP_SIZE)"),
    ({"ENABLE_PD_DEFAULTS": "maybe"}, "ENABLE_PD_DEFAULTS='maybe'"),
    ({"SPECULATIVE_ALGORITHM": "medusa"}, "invalid speculative 'medusa' (from env SPECULATIVE_ALGORITHM)"),
])
def test_bad_settings_name_field_and_source(env, message):
    with pytest.raises(PlanConfigError) as exc:
        load_plan_spec({}, None, env)
    assert message in str(exc.value)


def test_hardware_for_detects_unless_described():
    spec = PlanSpec(gpu_count=2)
    with pytest.raises(PlanError, match="gpu_count 2 asked for, but this machine has no GPU"):
        hardware_for(spec, detect=Hardware)
    assert hardware_for(PlanSpec(gpu_type="L4"), detect=Hardware).count == 1
    with pytest.raises(PlanError, match="unknown GPU type"):
        hardware_for(PlanSpec(gpu_type="Z80"))


# ---------------------------------------------------------------- the CLI


def test_cli_table(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(app, ["plan", "--model", QWEN7B, "--backend", "sglang", "--gpu-type", "H100",
                                      "--gpus", "8"])
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("mode pd", "router", "prefill-0", "decode-2", "CUDA_VISIBLE_DEVICES=6,7", "--disaggregation-mode",
                 "decisions", "replaced by 3 x TP2", "warning:"):
        assert text in out, text


def test_cli_json():
    result = CliRunner().invoke(app, ["plan", "-m", LLAMA8B, "--backend", "sglang", "--gpu-type", "H100", "--gpus",
                                      "2", "--speculative", "eagle", "--speculative-draft-model-path", DRAFT,
                                      "-o", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["mode"] == "pd" and data["pd_mode"] is True and data["pd_bootstrap_port"] == 8998
    assert [p["role"] for p in data["processes"]] == ["router", "prefill", "decode"]
    assert data["processes"][1]["cuda_visible_devices"] == "0" and data["processes"][1]["tp_size"] == 1
    assert data["speculative"]["algorithm"] == "eagle" and data["speculative"]["num_draft_tokens"] == 10
    assert data["sources"]["speculative"] == "cli"
    assert all({"setting", "value", "reason"} <= set(d) for d in data["decisions"])


@pytest.mark.parametrize("args, message", [
    (["--gpu-type", "A100", "--gpus", "8", "--h100-only"], "8 x NVIDIA A100-SXM4-80GB"),
    (["--gpu-type", "H100", "--gpus", "4", "--tp-size", "3"], "tp_size 3 (from cli) is not possible"),
    (["--gpu-type", "H100", "--precision", "int3"], "invalid precision"),
    (["--gpu-type", "H100", "-o", "yaml"], "expected table or json"),
])
def test_cli_impossible_plans_exit_2(args, message):
    result = CliRunner().invoke(app, ["plan", "-m", QWEN7B, "--backend", "sglang", *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_cli_help_lists_plan():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "plan" in result.output
