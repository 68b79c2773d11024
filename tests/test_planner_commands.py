"""Every generated engine command line is valid for the engine that will run it.

SGLang: each `sglang.launch_server` argv is parsed by SGLang 0.5.23's own parser
(`ServerArgs.add_cli_args`) and turned into `ServerArgs.from_cli_args`; each router argv by
sglang-router 0.3.2's `parse_router_args`. SGLang is installed without its dependencies
(`pip install --no-deps sglang==0.5.23` + orjson pybase64 msgspec pyzmq ipython aiohttp; sglang-router
normally); its module imports `triton` but the parser never uses it, so when triton is absent a stub
module stands in. Without sglang installed, the same argv are parsed by parsers rebuilt from the recorded
flag lists in fixtures/engine_flags (recorded from those versions by record_sglang.py).

vLLM: each `vllm serve` argv is checked against fixtures/engine_flags/vllm_serve_flags.json, written
from vLLM's `vllm serve --help` documentation.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from fleetserve.planner.hardware import synthetic_hardware
from fleetserve.planner.model_info import load_model_info
from fleetserve.planner.plan import make_plan
from fleetserve.planner.types import PlanSpec

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = FIXTURES / "model_configs"
FLAGS = FIXTURES / "engine_flags"
SGLANG_FLAGS = FLAGS / "sglang_0.5.23_server_args.json"
ROUTER_FLAGS = FLAGS / "sglang_router_0.3.2_args.json"
VLLM_FLAGS = FLAGS / "vllm_serve_flags.json"
DRAFT = "yuhuili/EAGLE-LLaMA3.1-Instruct-8B"


# ---------------------------------------------------------------- SGLang's own parser


class _TritonStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Stands in for `triton` (GPU kernel compiler): sglang imports it at module level, its parser never calls it."""

    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = mock.MagicMock(name=spec.name)
        module.__path__, module.__spec__, module.__name__ = [], spec, spec.name
        module.__version__ = "3.6.0"
        module.jit = lambda fn=None, **kw: fn if callable(fn) else (lambda f: f)
        module.autotune = lambda *a, **kw: (lambda f: f)
        module.heuristics = lambda *a, **kw: (lambda f: f)
        return module

    def exec_module(self, module):
        pass


def install_triton_stub_if_missing() -> None:
    if importlib.util.find_spec("triton") is None and not any(isinstance(f, _TritonStub) for f in sys.meta_path):
        sys.meta_path.append(_TritonStub())


def sglang_installed() -> bool:
    return importlib.util.find_spec("sglang") is not None and importlib.util.find_spec("sglang_router") is not None


SERVER_FIELDS = ["model_path", "tp_size", "host", "port", "quantization", "kv_cache_dtype", "dtype", "context_length",
                 "max_total_tokens", "mem_fraction_static", "schedule_conservativeness", "max_queued_requests",
                 "enable_metrics", "enable_p2p_check", "enable_torch_compile", "log_level", "served_model_name",
                 "revision", "disaggregation_mode", "disaggregation_bootstrap_port", "disaggregation_ib_device",
                 "disaggregation_transfer_backend", "speculative_algorithm", "speculative_num_steps",
                 "speculative_eagle_topk", "speculative_num_draft_tokens", "speculative_draft_model_path",
                 "speculative_token_map", "speculative_attention_mode"]

# Runs in a child process: importing sglang patches transformers process-wide, which must not leak
# into the rest of the test session.
_CHILD = """
import argparse, json, sys
from tests.test_planner_commands import SERVER_FIELDS, install_triton_stub_if_missing
install_triton_stub_if_missing()
from sglang.srt.server_args import ServerArgs
from sglang_router.launch_router import parse_router_args
jobs = json.load(sys.stdin)
out = []
for kind, argv in jobs:
    try:
        if kind == "server":
            parser = argparse.ArgumentParser(allow_abbrev=False, exit_on_error=False)
            ServerArgs.add_cli_args(parser)
            ns, extra = parser.parse_known_args(argv)
            if extra:
                raise ValueError(f"unrecognized arguments: {extra}")
            sa = ServerArgs.from_cli_args(ns)
            out.append({f: getattr(sa, f) for f in SERVER_FIELDS})
        else:
            ra = parse_router_args(argv)
            out.append({"pd_disaggregation": ra.pd_disaggregation, "prefill_urls": ra.prefill_urls,
                        "decode_urls": ra.decode_urls, "decode_policy": ra.decode_policy, "port": ra.port,
                        "host": ra.host})
    except BaseException as exc:
        out.append({"error": f"{type(exc).__name__}: {exc}"})
print(json.dumps(out))
"""


def parse_with_sglang(jobs: list[tuple[str, list[str]]]) -> list[dict]:
    """[("server" | "router", argv)] -> what SGLang's own parsers made of each (or {"error": ...})."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(jobs), capture_output=True, text=True,
                          cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- parsers rebuilt from recorded flag lists


def _human_int(text: str) -> int:
    text = text.strip().lower()
    mult = {"k": 1000, "m": 1000**2}.get(text[-1:], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


_TYPES = {"int": int, "float": float, "str": str, "human_readable_int": _human_int, "nullable_str": str}


def recorded_parser(path: Path) -> argparse.ArgumentParser:
    """An argparse parser with exactly the recorded options, nargs, choices and types."""
    data = json.loads(path.read_text())
    parser = argparse.ArgumentParser(allow_abbrev=False, exit_on_error=False, add_help=False)
    for a in data["actions"]:
        kwargs = {"dest": a["dest"], "default": a.get("default")}
        if a["action"] == "BooleanOptionalAction":
            kwargs["action"] = argparse.BooleanOptionalAction
            parser.add_argument(*[s for s in a["option_strings"] if not s.startswith("--no-")], **kwargs)
            continue
        if a["nargs"] == 0 or a["action"] in ("_StoreTrueAction", "_StoreFalseAction", "_StoreConstAction",
                                               "DeprecatedStoreConstAction"):
            kwargs["action"] = "store_const"  # flags without a value (store_true and deprecated variants)
            kwargs["const"] = a["const"]
        else:
            if a["action"] == "_AppendAction":
                kwargs["action"] = "append"
            if a["nargs"] is not None:
                kwargs["nargs"] = a["nargs"]
            if a["choices"] is not None:
                kwargs["choices"] = a["choices"]
            kwargs["type"] = _TYPES.get(a["type"] or "str", str)
        parser.add_argument(*a["option_strings"], **kwargs)
    return parser


def parse_strict(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse or fail the test with argparse's own message (unknown flags, bad choices, bad numbers)."""
    try:
        ns, extra = parser.parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit) as exc:
        pytest.fail(f"rejected by the parser: {exc}\nargv: {argv}")
    assert not extra, f"unknown arguments {extra} in {argv}"
    return ns


# ---------------------------------------------------------------- the plans whose commands are checked


def plan(model: str, gpu: str, count: int, **spec):
    return make_plan(PlanSpec(model=str(CONFIGS / model), **spec), synthetic_hardware(gpu, count),
                     load_model_info(str(CONFIGS / model)))


SGLANG_CASES = {
    "8xH100 qwen7b PD (TP3 replaced)": ("Qwen2.5-7B-Instruct", "H100", 8, {}),
    "8xH100 llama70b PD": ("Llama-3.1-70B-Instruct", "H100", 8, {}),
    "4xH100 llama8b PD": ("Llama-3.1-8B-Instruct", "H100", 4, {}),
    "2xH100 mistral PD + EAGLE": ("Mistral-7B-Instruct-v0.3", "H100", 2,
                                  {"speculative": "eagle", "speculative_draft_model_path": DRAFT}),
    "2xH100 PD + pinned IB + nixl + bootstrap": ("Llama-3.1-8B-Instruct", "H100", 2,
                                                 {"pd_ib_device": "mlx5_0,mlx5_1", "pd_transfer_backend": "nixl",
                                                  "pd_bootstrap_port": 9100}),
    "8xH100 explicit TP8": ("Llama-3.1-8B-Instruct", "H100", 8, {"tp_size": 8}),
    "8xH100 PD off": ("Qwen2.5-7B-Instruct", "H100", 8, {"pd": "off"}),
    "1xH100 EAGLE3 + every option": ("Llama-3.1-8B-Instruct", "H100", 1, {
        "speculative": "eagle3", "speculative_draft_model_path": DRAFT, "speculative_num_steps": 3,
        "speculative_eagle_topk": 4, "speculative_num_draft_tokens": 8, "speculative_token_map": "/maps/tm.pt",
        "speculative_attention_mode": "decode", "mem_fraction_static": 0.8, "schedule_conservativeness": 0.5,
        "max_queued_requests": 64, "enable_p2p_check": True, "enable_torch_compile": True,
        "max_total_tokens": 200000, "max_model_len": 8192, "served_model_name": "llama", "revision": "main",
        "log_level": "debug", "kv_cache_dtype": "fp8_e4m3"}),
    "1xH100 ngram": ("Qwen2.5-0.5B-Instruct", "H100", 1, {"speculative": "ngram",
                                                          "speculative_num_draft_tokens": 8}),
    "2xA100 bf16": ("Qwen2.5-7B-Instruct", "A100", 2, {}),
    "4xL4 fp16 explicit": ("Qwen2.5-0.5B-Instruct", "L4", 4, {"precision": "fp16", "enable_metrics": False}),
    "1xT4 auto fp16": ("Qwen2.5-0.5B-Instruct", "T4", 1, {}),
    "8xH200 fp32": ("Qwen2.5-0.5B-Instruct", "H200", 8, {"precision": "fp32", "tp_size": 2}),
}


def sglang_plans():
    return [pytest.param(case, id=name) for name, case in SGLANG_CASES.items()]


def _check_server_ns(ns, proc, p) -> None:
    s = p.settings
    assert ns.tp_size == proc.tp_size and ns.port == proc.port and ns.host == proc.host
    assert ns.model_path == s.model
    assert ns.quantization == s.quantization
    assert ns.kv_cache_dtype == (s.kv_cache_dtype or "auto")
    assert ns.dtype == (s.dtype or "auto")
    assert ns.disaggregation_mode == ("null" if proc.role == "unified" else proc.role)
    if proc.role == "prefill":
        assert ns.disaggregation_bootstrap_port == proc.bootstrap_port
    assert ns.enable_metrics is s.enable_metrics
    if s.speculative == "none":
        assert ns.speculative_algorithm is None
    else:
        assert ns.speculative_algorithm == s.speculative.upper()
        assert ns.speculative_num_steps == s.speculative_num_steps
        assert ns.speculative_num_draft_tokens == s.speculative_num_draft_tokens
        if s.speculative != "ngram":
            assert ns.speculative_eagle_topk == s.speculative_eagle_topk
            assert ns.speculative_draft_model_path == s.speculative_draft_model_path


def _check_router(args, proc, p) -> None:
    prefill = [(q.url, q.bootstrap_port) for q in p.by_role("prefill")]
    decode = [q.url for q in p.by_role("decode")]
    assert args.pd_disaggregation is True
    assert [tuple(x) for x in args.prefill_urls] == prefill and list(args.decode_urls) == decode
    assert args.port == proc.port
    if len(decode) > 1:
        assert args.decode_policy == "round_robin"


@pytest.fixture(scope="module")
def sglang_verdicts():
    """Every SGLang case's plan, and SGLang's own parse of each of its processes (one child process)."""
    if not sglang_installed():
        pytest.skip("sglang==0.5.23 / sglang-router not installed (pip install --no-deps sglang==0.5.23); "
                    "test_sglang_commands_parse_with_the_recorded_flags covers the same argv")
    plans = {name: plan(m, g, n, backend="sglang", **spec) for name, (m, g, n, spec) in SGLANG_CASES.items()}
    jobs, keys = [], []
    for name, p in plans.items():
        for proc in p.processes:
            jobs.append(("router" if proc.role == "router" else "server", proc.argv[3:]))
            keys.append((name, proc.name))
    return plans, dict(zip(keys, parse_with_sglang(jobs)))


@pytest.mark.parametrize("name", list(SGLANG_CASES))
def test_sglang_commands_parse_with_sglangs_own_parser(name, sglang_verdicts):
    plans, verdicts = sglang_verdicts
    p = plans[name]
    for proc in p.processes:
        got = verdicts[(name, proc.name)]
        assert "error" not in got, f"SGLang rejected {proc.name}: {got.get('error')}\n{proc.command}"
        if proc.role == "router":
            assert proc.argv[1:3] == ["-m", "sglang_router.launch_router"]
            _check_router(argparse.Namespace(**got), proc, p)
        else:
            assert proc.argv[1:3] == ["-m", "sglang.launch_server"]
            _check_server_ns(argparse.Namespace(**got), proc, p)


@pytest.mark.parametrize("case", sglang_plans())
def test_sglang_commands_parse_with_the_recorded_flags(case):
    server, router = recorded_parser(SGLANG_FLAGS), recorded_parser(ROUTER_FLAGS)
    model, gpu, count, spec = case
    p = plan(model, gpu, count, backend="sglang", **spec)
    for proc in p.processes:
        if proc.role == "router":
            ns = parse_strict(router, proc.argv[3:])
            assert ns.pd_disaggregation is True
            assert [x[0] for x in ns.prefill] == [q.url for q in p.by_role("prefill")]
            assert [x[0] for x in ns.decode] == [q.url for q in p.by_role("decode")]
            continue
        _check_server_ns(parse_strict(server, proc.argv[3:]), proc, p)


def test_recorded_parsers_reject_what_sglang_would():
    server = recorded_parser(SGLANG_FLAGS)
    for bad in (["--model-path", "m", "--tp", "2"],  # abbreviations are not accepted
                ["--model-path", "m", "--kv-cache-dtype", "fp8"],  # SGLang spells it fp8_e5m2 / fp8_e4m3
                ["--model-path", "m", "--disaggregation-mode", "both"],
                ["--model-path", "m", "--tp-size", "two"]):
        with pytest.raises((argparse.ArgumentError, SystemExit, AssertionError, pytest.fail.Exception)):
            parse_strict(server, bad)


def test_recorded_flags_match_the_installed_sglang(tmp_path):
    """The recorded flag lists are what the installed SGLang 0.5.23 / router 0.3.2 accept (no drift)."""
    if not sglang_installed():
        pytest.skip("sglang not installed")
    root = Path(__file__).resolve().parent.parent
    script = ("import json, sys; sys.argv = ['x']; import runpy; "
              "from tests.test_planner_commands import install_triton_stub_if_missing; "
              "install_triton_stub_if_missing(); import sglang; print(sglang.__version__)")
    version = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root,
                             timeout=300).stdout.strip().splitlines()[-1]
    if version != "0.5.23":
        pytest.skip(f"recorded for sglang 0.5.23, installed {version}")
    out = tmp_path / "flags"
    out.mkdir()
    code = (f"import sys; sys.path.insert(0, {str(FLAGS)!r}); import record_sglang; "
            f"from pathlib import Path; record_sglang.HERE = Path({str(out)!r}); record_sglang.main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for recorded in (SGLANG_FLAGS, ROUTER_FLAGS):
        live = json.loads((out / recorded.name).read_text())["actions"]
        assert [a["option_strings"] for a in live] == [a["option_strings"] for a in json.loads(
            recorded.read_text())["actions"]], f"{recorded.name} is out of date: run record_sglang.py"


# ---------------------------------------------------------------- vLLM against `vllm serve --help`


def check_vllm_argv(argv: list[str]) -> dict[str, object]:
    """Validate a `vllm serve` argv against the fixture; returns {flag: value}. Fails the test on any problem."""
    doc = json.loads(VLLM_FLAGS.read_text())
    flags = doc["flags"]
    alias = {a: name for name, f in flags.items() for a in f.get("aliases", [])}
    assert argv[:2] == ["vllm", "serve"], argv
    assert argv[2] and not argv[2].startswith("-"), "the model is vllm serve's positional model_tag"
    out: dict[str, object] = {"model_tag": argv[2]}
    i = 3
    while i < len(argv):
        raw = argv[i]
        name = alias.get(raw, raw)
        negated = name.startswith("--no-") and flags.get("--" + name[5:], {}).get("kind") == "bool_optional"
        spec = flags.get("--" + name[5:]) if negated else flags.get(name)
        assert spec is not None, f"{raw} is not a `vllm serve` flag (fixture {VLLM_FLAGS.name})"
        kind = spec.get("kind", "value")
        if kind in ("store_true", "bool_optional"):
            out["--" + name[5:] if negated else name] = not negated
            i += 1
            continue
        nargs = spec.get("nargs")
        values = []
        i += 1
        while i < len(argv) and not argv[i].startswith("-") and (nargs == "+" or not values):
            values.append(argv[i])
            i += 1
        assert values, f"{raw} needs a value"
        for v in values:
            typ = spec.get("type", "str")
            if typ == "int":
                int(v)
            elif typ == "float":
                float(v)
            elif typ == "human_int":
                _human_int(v)
            elif typ == "json":
                assert isinstance(json.loads(v), dict), f"{raw} takes a JSON object"
            if "choices" in spec:
                assert (int(v) if typ == "int" else v) in spec["choices"], f"{raw} {v}: not one of {spec['choices']}"
        out[name] = values if nargs == "+" else values[0]
    return out


VLLM_CASES = {
    "8xH100 llama70b fp8 (PD is sglang-only)": ("Llama-3.1-70B-Instruct", "H100", 8, {}),
    "2xA100 qwen7b bf16": ("Qwen2.5-7B-Instruct", "A100", 2, {}),
    "1xH100 EAGLE3 + options": ("Llama-3.1-8B-Instruct", "H100", 1, {
        "speculative": "eagle3", "speculative_draft_model_path": DRAFT, "mem_fraction_static": 0.9,
        "max_model_len": 32768, "served_model_name": "llama", "revision": "main", "log_level": "warning"}),
    "1xL4 ngram": ("Qwen2.5-0.5B-Instruct", "L4", 1, {"speculative": "ngram"}),
    "4xH100 explicit TP2 fp16": ("Mistral-7B-Instruct-v0.3", "H100", 4, {"tp_size": 2, "precision": "fp16"}),
}


@pytest.mark.parametrize("case", [pytest.param(c, id=n) for n, c in VLLM_CASES.items()])
def test_vllm_commands_match_vllm_serve_help(case):
    model, gpu, count, spec = case
    p = plan(model, gpu, count, backend="vllm", **spec)
    assert p.mode == "unified" and len(p.processes) == 1
    (proc,) = p.processes
    got = check_vllm_argv(proc.argv)
    s = p.settings
    assert got["--tensor-parallel-size"] == str(proc.tp_size) and got["--port"] == str(proc.port)
    assert got.get("--quantization") == s.quantization and got.get("--kv-cache-dtype") == s.kv_cache_dtype
    assert got.get("--dtype") == s.dtype
    if s.speculative != "none":
        cfg = json.loads(got["--speculative-config"])
        assert cfg["method"] == s.speculative and cfg["num_speculative_tokens"] >= 1
        if s.speculative != "ngram":
            assert cfg["model"] == DRAFT


def test_vllm_checker_catches_sglang_spellings():
    with pytest.raises(AssertionError, match="not a `vllm serve` flag"):
        check_vllm_argv(["vllm", "serve", "m", "--tp-size", "2"])
    with pytest.raises(AssertionError, match="not one of"):
        check_vllm_argv(["vllm", "serve", "m", "--kv-cache-dtype", "fp8_e5m3"])
    assert check_vllm_argv(["vllm", "serve", "m", "-tp", "2", "--no-enable-prefix-caching"]) == {
        "model_tag": "m", "--tensor-parallel-size": "2", "--enable-prefix-caching": False}


def test_vllm_unsupported_settings_become_warnings():
    p = plan("Llama-3.1-8B-Instruct", "H100", 1, backend="vllm", max_total_tokens=100000,
             schedule_conservativeness=0.3, max_queued_requests=10)
    text = "\n".join(p.warnings)
    assert "max_total_tokens=100000 has no vLLM flag" in text and "schedule_conservativeness" in text
    assert "max_queued_requests" in text
    assert "--max-total-tokens" not in p.processes[0].argv
