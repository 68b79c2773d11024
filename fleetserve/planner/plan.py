"""`make_plan(spec, hardware, model_info) -> Plan`: a pure function from what was asked and what is
there to the exact processes to launch, with the reason for every automatic choice.

Rules (DESIGN.md "Control plane: Planner", seeds 000-002):

- H100 guard: with `h100_only`, anything but H100s is refused, naming what was found.
- Precision `auto`: FP8 weights (`quantization=fp8`) + FP8 KV cache (`fp8_e5m2`) on H100/H200 for the
  sglang and vllm backends; bf16 elsewhere (fp16 before Ampere, fp32 on CPU). Explicit values win.
- TP is valid when the attention heads and the MLP width divide by it and the KV heads either divide
  by it or divide it (SGLang replicates KV heads when TP exceeds them); weights + the KV cache of
  one max-length request must fit in the usable GPU memory.
- PD disaggregation (sglang only) is automatic when every GPU is an H100, there are 2, 4 or 8 of
  them, TP was not given and `pd` is not off (ENABLE_PD_DEFAULTS=false). Seed 002's splits:
  8 -> prefill TP2 on GPUs 0-1 + two TP3 decode replicas on 2-4 and 5-7 (round-robin); 4 -> TP1 + TP3;
  2 -> TP1 + TP1. A TP the model cannot use is replaced by the nearest valid one over the same GPUs
  (more replicas), and the plan says so. A router (sglang_router) fronts prefill and decode.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fleetserve.planner import sglang as sglang_cmd
from fleetserve.planner import vllm as vllm_cmd
from fleetserve.planner.hardware import Hardware
from fleetserve.planner.model_info import ModelInfo
from fleetserve.planner.types import (
    PD_GPU_COUNTS,
    SPEC_DEFAULTS,
    Decision,
    EngineSettings,
    MemoryCheck,
    Plan,
    PlanError,
    PlanSpec,
    Process,
)

GIB = 1 << 30
DEFAULT_MEM_FRACTION = {"sglang": 0.85, "vllm": 0.90, "native": 0.85}
NATIVE_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                        "llama", "mistral", "qwen2", "qwen3"}
# Seed 002's splits: GPU count -> ((prefill TP, replicas), (decode TP, replicas)).
SEED_PD_SPLITS = {8: ((2, 1), (3, 2)), 4: ((1, 1), (3, 1)), 2: ((1, 1), (1, 1))}
_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_KV_BYTES = {"fp8_e5m2": 1, "fp8_e4m3": 1, "fp8": 1, "fp8_inc": 1, "int8": 1, "mxfp8": 1,
             "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}
_WEIGHT_BYTES = {"fp8": 1.0, "w8a8_fp8": 1.0, "modelopt_fp8": 1.0, "fbgemm_fp8": 1.0, "w8a8_int8": 1.0,
                 "awq": 0.5, "gptq": 0.5, "awq_marlin": 0.5, "gptq_marlin": 0.5, "mxfp4": 0.5, "modelopt_fp4": 0.5,
                 "bitsandbytes": 0.5, "compressed-tensors": 1.0}


def gpus_words(gpus: list[int]) -> str:
    """[0] -> "GPU 0", [2, 3, 4] -> "GPUs 2-4"."""
    return ("GPU " if len(gpus) == 1 else "GPUs ") + gpu_ranges(gpus)


def _groups_words(groups: list[list[int]]) -> str:
    """[[2, 3], [4, 5]] -> "GPUs 2-3 / 4-5" (one engine per group)."""
    if len(groups) == 1:
        return gpus_words(groups[0])
    return "GPUs " + " / ".join(gpu_ranges(g) for g in groups)


def gpu_ranges(gpus: list[int]) -> str:
    """[2, 3, 4] -> "2-4", [0] -> "0", [0, 2] -> "0,2"."""
    if gpus and gpus == list(range(gpus[0], gpus[-1] + 1)) and len(gpus) > 1:
        return f"{gpus[0]}-{gpus[-1]}"
    return ",".join(map(str, gpus))


def tp_split_problem(num_heads: int, num_kv_heads: int, intermediate_size: int, tp: int) -> str | None:
    """Why a model with these shapes cannot be split over `tp` ranks, or None. One rule for the planner
    and the native engine's tensor parallelism (each rank holds whole heads; KV heads may be replicated)."""
    if tp == 1:
        return None
    problems = []
    if num_heads % tp:
        problems.append(f"its {num_heads} attention heads are not divisible by {tp}")
    if num_kv_heads % tp and tp % num_kv_heads:
        problems.append(f"its {num_kv_heads} KV heads neither divide by {tp} nor divide {tp}")
    if intermediate_size % tp:
        problems.append(f"its MLP width {intermediate_size} is not divisible by {tp}")
    return "; ".join(problems) or None


def tp_problem(mi: ModelInfo, tp: int) -> str | None:
    """Why `mi` cannot be split over `tp` GPUs by tensor parallelism, or None if it can."""
    return tp_split_problem(mi.num_attention_heads, mi.num_kv_heads, mi.intermediate_size, tp)


def valid_tps(mi: ModelInfo, max_tp: int) -> list[int]:
    return [t for t in range(1, max_tp + 1) if tp_problem(mi, t) is None]


@dataclass
class _Ctx:
    spec: PlanSpec
    hw: Hardware
    mi: ModelInfo
    sources: Mapping[str, str]
    decisions: list[Decision]
    warnings: list[str]
    weight_bytes_per_param: float = 2.0
    kv_bytes: float = 2.0
    mem_fraction: float = 0.85
    draft_bytes: int = 0
    kv_tokens: int = 0

    def decide(self, setting: str, value, reason: str) -> None:
        self.decisions.append(Decision(setting, value, reason))

    def src(self, field: str) -> str:
        source = self.sources.get(field)
        return f" (from {source})" if source and source != "default" else ""

    def explicit(self, field: str) -> bool:
        return field in self.spec.model_fields_set

    def memory(self, role: str, tp: int) -> MemoryCheck:
        gpu_gib = self.hw.min_memory_mib / 1024
        usable = gpu_gib * self.mem_fraction
        weights = (self.mi.weight_bytes(self.weight_bytes_per_param) / tp + self.draft_bytes) / GIB
        per_token = self.mi.kv_bytes_per_token(self.kv_bytes, tp)
        kv = per_token * self.kv_tokens / GIB
        capacity = int(max(0.0, usable - weights) * GIB / per_token) if per_token else 0
        return MemoryCheck(role, tp, gpu_gib, usable, weights, kv, self.kv_tokens, capacity)


def make_plan(spec: PlanSpec, hardware: Hardware, model_info: ModelInfo,
              sources: Mapping[str, str] | None = None) -> Plan:
    """The launch plan, or PlanError with the reason when none is possible."""
    ctx = _Ctx(spec, hardware, model_info, sources or {}, [], [])
    hw = hardware
    ctx.decide("hardware", hw.describe(), f"{'described' if hw.source == 'synthetic' else 'detected'} "
               f"({hw.source})" + (f", interconnect {hw.interconnect}" if hw.interconnect else ""))
    ctx.warnings += [n for n in hw.notes if "not detected" not in n]
    _guard(ctx)
    check_hardware(spec, hw)
    if len(hw.families) > 1:
        ctx.warnings.append(f"mixed GPUs ({hw.describe()}): planning with the smallest memory "
                            f"({hw.min_memory_mib / 1024:.0f} GiB) for every GPU")
    settings = _settings(ctx)
    _memory_model(ctx, settings)
    if spec.backend == "native":
        return _native_plan(ctx, settings)

    pd = _want_pd(ctx)
    if pd:
        layout = _pd_layout(ctx)
        if layout is not None:
            return _pd_plan(ctx, settings, layout)
    return _unified_plan(ctx, settings)


# ---------------------------------------------------------------- guard, precision, settings


def check_hardware(spec: PlanSpec, hw: Hardware, sources: Mapping[str, str] | None = None) -> None:
    """The checks that need no model: the H100 guard and GPUs for the GPU backends (run before any download)."""
    if spec.h100_only and not hw.all_h100:
        _guard(_Ctx(spec, hw, None, sources or {}, [], []))  # type: ignore[arg-type]
    if spec.backend in ("sglang", "vllm") and hw.cpu_only:
        raise PlanError(f"the {spec.backend} backend needs NVIDIA GPUs and this machine has {hw.describe()}; "
                        "use --backend native, or plan for another machine with --gpu-type TYPE --gpus N")


def _guard(ctx: _Ctx) -> None:
    if not ctx.spec.h100_only:
        return
    hw = ctx.hw
    if hw.all_h100:
        ctx.decide("h100_only", True, f"H100 guard passed: all {hw.count} GPU(s) are H100{ctx.src('h100_only')}")
        return
    found = hw.describe()
    others = sorted({g.name for g in hw.gpus if g.family != "H100"})
    raise PlanError(f"h100_only is set{ctx.src('h100_only')} but this machine has {found}"
                    + (f" ({', '.join(others)} {'is' if len(others) == 1 else 'are'} not H100)" if others else "")
                    + "; run on H100 GPUs, or unset h100_only (H100_ONLY / --h100-only) to plan anyway")


def _settings(ctx: _Ctx) -> EngineSettings:
    spec, hw, mi = ctx.spec, ctx.hw, ctx.mi
    dtype: str | None = None
    quantization = spec.quantization
    kv = spec.kv_cache_dtype
    hopper = hw.family in ("H100", "H200")
    if spec.precision == "auto":
        if spec.backend == "native":
            precision = "fp32" if hw.cpu_only else "bf16" if (hw.min_compute_capability or 0) >= 8.0 else "fp16"
            ctx.decide("precision", precision, "auto: " + (
                "fp32 on CPU" if hw.cpu_only else "the native engine runs bf16 on GPUs (no FP8 path yet)"
                if precision == "bf16" else "fp16: GPUs before Ampere have no bf16"))
        elif hopper and spec.auto_use_fp8_on_h100 and quantization is None and mi.quantization is None:
            precision = "fp8"
            quantization = "fp8"
            ctx.decide("precision", "fp8", f"auto on {hw.family}: FP8 weights (quantization=fp8) use Hopper's FP8 "
                       "tensor cores and halve weight memory (seed 000 auto_use_fp8_on_h100)")
            if kv is None:
                kv = "fp8_e5m2"
                ctx.decide("kv_cache_dtype", kv, f"auto on {hw.family}: an FP8 KV cache holds twice the tokens")
        else:
            cc = hw.min_compute_capability or 0
            precision = "bf16" if cc >= 8.0 else "fp16"
            why = ("the checkpoint is already quantized (" + (quantization or mi.quantization or "") + ")"
                   if (quantization or mi.quantization) else
                   "auto_use_fp8_on_h100 is off" if hopper else
                   f"the FP8 default is for H100/H200 and these are {', '.join(hw.families)}" if cc >= 8.0 else
                   f"{', '.join(hw.families)} GPUs predate bf16 (sm < 80)")
            ctx.decide("precision", precision, f"auto: {precision} because {why}")
            dtype = _DTYPE_NAMES[precision] if not (quantization or mi.quantization) else None
    else:
        precision = spec.precision
        ctx.decide("precision", precision, f"explicit{ctx.src('precision')}")
        if precision == "fp8":
            if spec.backend == "native":
                raise PlanError("precision fp8 is not available with the native engine (it runs fp32, bf16 or fp16); "
                                "use --backend sglang or vllm for FP8, or choose bf16")
            quantization = quantization or "fp8"
            if kv is None:
                kv = "fp8_e5m2"
                ctx.decide("kv_cache_dtype", kv, "precision fp8: FP8 KV cache (fp8_e5m2) as well")
            if not hw.fp8_capable and not hw.cpu_only:
                ctx.warnings.append(f"precision fp8 on {hw.describe()}: these GPUs have no FP8 tensor cores (sm < 89), "
                                    "so FP8 weights run through a slower weight-only path")
        else:
            if precision == "bf16" and 0 < (hw.min_compute_capability or 8.0) < 8.0:
                raise PlanError(f"precision bf16 needs Ampere or newer (sm80+); this machine has {hw.describe()}; "
                                "use fp16")
            dtype = _DTYPE_NAMES[precision]
            if precision == "fp32" and not hw.cpu_only:
                ctx.warnings.append("precision fp32 on GPUs doubles weight memory and is much slower than bf16")
    if spec.quantization is not None:
        ctx.decide("quantization", spec.quantization, f"explicit{ctx.src('quantization')}")
    if spec.kv_cache_dtype is not None:
        ctx.decide("kv_cache_dtype", spec.kv_cache_dtype, f"explicit{ctx.src('kv_cache_dtype')}")
        if spec.kv_cache_dtype == "auto":
            kv = None
    if spec.backend == "native" and (quantization or (kv and kv not in ("auto",))):
        raise PlanError("quantization and kv_cache_dtype are engine settings of the sglang and vllm backends; "
                        "the native engine keeps weights and KV cache in its precision (remove them or change backend)")

    max_len = spec.max_model_len or mi.max_position_embeddings
    if spec.max_model_len and spec.max_model_len > mi.max_position_embeddings:
        raise PlanError(f"max_model_len {spec.max_model_len}{ctx.src('max_model_len')} exceeds the context length of "
                        f"{mi.name} ({mi.max_position_embeddings} tokens); use at most {mi.max_position_embeddings}")
    ctx.decide("max_model_len", max_len, f"explicit{ctx.src('max_model_len')}" if spec.max_model_len
               else "the model's context length (max_position_embeddings)")
    if spec.max_total_tokens and spec.max_total_tokens < max_len:
        ctx.warnings.append(f"max_total_tokens (KV pool, {spec.max_total_tokens} tokens) is smaller than max_model_len "
                            f"({max_len}): one long request cannot hold its whole context in the cache")

    spec_fields = _speculative(ctx)
    return EngineSettings(
        model=spec.model, revision=spec.revision, served_model_name=spec.served_model_name, dtype=dtype,
        precision=precision, quantization=quantization, kv_cache_dtype=kv, max_model_len=max_len,
        max_total_tokens=spec.max_total_tokens, mem_fraction_static=spec.mem_fraction_static,
        schedule_conservativeness=spec.schedule_conservativeness, max_queued_requests=spec.max_queued_requests,
        enable_metrics=spec.enable_metrics, enable_p2p_check=spec.enable_p2p_check,
        enable_torch_compile=spec.enable_torch_compile, log_level=spec.log_level, host=spec.engine_host,
        python=spec.python, pd_ib_device=spec.pd_ib_device, pd_transfer_backend=spec.pd_transfer_backend,
        **spec_fields,
    )


def _speculative(ctx: _Ctx) -> dict:
    spec = ctx.spec
    algo = spec.speculative
    out: dict = {"speculative": algo}
    if algo == "none":
        return out
    if ctx.spec.backend == "native":
        if algo == "eagle3":
            raise PlanError("speculative eagle3 is not available with the native engine (it runs ngram and EAGLE-1 "
                            "heads); use --backend sglang or vllm, or --speculative ngram / eagle")
        if algo == "eagle" and not spec.speculative_draft_model_path:
            raise PlanError("speculative eagle needs a draft model: set --speculative-draft-model-path")
        out.update(speculative_num_steps=spec.speculative_num_steps,
                   speculative_num_draft_tokens=spec.speculative_num_draft_tokens,
                   speculative_draft_model_path=spec.speculative_draft_model_path)
        ctx.decide("speculative", algo.upper(), f"explicit{ctx.src('speculative')}: the native engine verifies "
                   "drafts of greedy requests (sampled requests decode normally)")
        return out
    if algo in ("eagle", "eagle3"):
        if not spec.speculative_draft_model_path:
            raise PlanError(f"speculative {algo} needs a draft model: set --speculative-draft-model-path "
                            "(env SPECULATIVE_DRAFT_MODEL_PATH), e.g. an EAGLE head trained for "
                            f"{ctx.mi.name}")
        for key, default in SPEC_DEFAULTS.items():
            field = f"speculative_{key}"
            value = getattr(spec, field)
            if value is None:
                out[field] = default
                ctx.decide(field, default, "seed 002's recommended EAGLE starting point (steps 2, topk 6, "
                           "draft tokens 10); tune by acceptance rate")
            else:
                out[field] = value
                ctx.decide(field, value, f"explicit{ctx.src(field)}")
        out["speculative_draft_model_path"] = spec.speculative_draft_model_path
        out["speculative_token_map"] = spec.speculative_token_map
        out["speculative_attention_mode"] = spec.speculative_attention_mode
        ctx.decide("speculative", algo.upper(), f"explicit{ctx.src('speculative')}; draft model "
                   f"{spec.speculative_draft_model_path}")
    else:  # ngram: drafts from the context itself, no extra weights
        out["speculative_num_draft_tokens"] = spec.speculative_num_draft_tokens
        out["speculative_num_steps"] = spec.speculative_num_steps
        ctx.decide("speculative", "NGRAM", f"explicit{ctx.src('speculative')}: drafts come from n-grams of the "
                   "prompt and output, no draft model")
    return out


def _memory_model(ctx: _Ctx, s: EngineSettings) -> None:
    spec, mi = ctx.spec, ctx.mi
    quant = s.quantization or mi.quantization
    if quant:
        ctx.weight_bytes_per_param = _WEIGHT_BYTES.get(quant, 1.0)
    else:
        ctx.weight_bytes_per_param = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0}.get(s.precision, 2.0)
    base_kv = 4.0 if s.precision == "fp32" else 2.0
    ctx.kv_bytes = _KV_BYTES.get(s.kv_cache_dtype or "", base_kv)
    ctx.mem_fraction = spec.mem_fraction_static or DEFAULT_MEM_FRACTION[spec.backend]
    ctx.kv_tokens = max(s.max_model_len, spec.max_total_tokens or 0)
    if s.speculative in ("eagle", "eagle3"):
        per_layer = (mi.num_params - mi.embedding_params - mi.hidden_size) // max(1, mi.num_layers)
        ctx.draft_bytes = 2 * (per_layer + mi.vocab_size * mi.hidden_size)  # one bf16 layer + its LM head


# ---------------------------------------------------------------- layouts


def _check_tp(ctx: _Ctx, tp: int, role: str) -> MemoryCheck:
    problem = tp_problem(ctx.mi, tp)
    if problem:
        allowed = ", ".join(map(str, valid_tps(ctx.mi, max(ctx.hw.count, 8))))
        raise PlanError(f"tp_size {tp}{ctx.src('tp_size')} is not possible for {ctx.mi.name}: {problem}; "
                        f"valid TP sizes: {allowed}")
    check = ctx.memory(role, tp)
    if ctx.hw.cpu_only:
        return check
    if not check.fits:
        larger = [t for t in valid_tps(ctx.mi, ctx.hw.count) if t > tp and ctx.memory(role, t).fits]
        hint = (f"; TP {larger[0]} would fit" if larger else
                f"; lower max_model_len (about {check.kv_capacity_tokens} tokens fit) or use FP8 / more GPUs"
                if check.kv_capacity_tokens > 0 else "; the weights alone do not fit: use more GPUs or a smaller model")
        raise PlanError(f"{ctx.mi.name} does not fit with TP {tp} on {ctx.hw.describe()}: {check.describe()}{hint}")
    return check


def _unified_plan(ctx: _Ctx, s: EngineSettings) -> Plan:
    spec, hw, mi = ctx.spec, ctx.hw, ctx.mi
    if spec.tp_size is not None:
        tp = spec.tp_size
        if tp > hw.count:
            raise PlanError(f"tp_size {tp}{ctx.src('tp_size')} needs {tp} GPUs; this machine has {hw.describe()}")
        ctx.decide("tp_size", tp, f"explicit{ctx.src('tp_size')}")
    else:
        options = valid_tps(mi, hw.count)
        fitting = [t for t in options if ctx.memory("unified", t).fits]
        tp = max(options)
        if fitting and max(fitting) == tp:
            reason = (f"the largest TP {mi.name} allows on {hw.count} GPU(s) ({mi.num_attention_heads} heads, "
                      f"{mi.num_kv_heads} KV heads)")
        else:
            reason = f"the largest TP {mi.name} allows on {hw.count} GPU(s)"
        ctx.decide("tp_size", tp, reason)
    check = _check_tp(ctx, tp, "unified")
    gpus = list(range(tp))
    if hw.count > tp:
        ctx.warnings.append(f"GPUs {gpu_ranges(list(range(tp, hw.count)))} stay unused (TP {tp}); add replicas "
                            "to use them")
    port = spec.engine_port
    ctx.decide("mode", "unified", _unified_reason(ctx))
    if spec.backend == "sglang":
        argv = sglang_cmd.server_argv(s, role="unified", tp_size=tp, port=port, context_length=_ctx_len(ctx, s))
    else:
        argv = vllm_cmd.serve_argv(s, tp_size=tp, port=port, context_length=_ctx_len(ctx, s))
        ctx.warnings += vllm_cmd.unsupported(s)
    proc = Process("engine", "unified", gpus, tp, port, argv, {"CUDA_VISIBLE_DEVICES": gpu_ranges_csv(gpus)},
                   host=s.host)
    ctx.decide("memory", f"TP {tp}", check.describe() + f"; room for about {check.kv_capacity_tokens:,} KV tokens")
    return _finish(ctx, s, "unified", [proc], proc.url, None, [check])


def _unified_reason(ctx: _Ctx) -> str:
    spec, hw = ctx.spec, ctx.hw
    if spec.backend == "vllm":
        return "PD disaggregation is planned for the sglang backend only"
    if spec.pd == "off":
        return f"PD disaggregation disabled{ctx.src('pd')}"
    if spec.tp_size is not None:
        return "explicit tp_size disables the automatic PD split (seed 002)"
    if not hw.all_h100:
        return f"automatic PD needs all GPUs to be H100; found {hw.describe()}"
    if hw.count not in PD_GPU_COUNTS:
        return f"automatic PD needs exactly 2, 4 or 8 H100s; found {hw.count}"
    return "the PD split does not fit this model (see decisions)"


def gpu_ranges_csv(gpus: list[int]) -> str:
    return ",".join(map(str, gpus))


def _ctx_len(ctx: _Ctx, s: EngineSettings) -> int | None:
    return s.max_model_len if ctx.spec.max_model_len else None


def _want_pd(ctx: _Ctx) -> bool:
    spec, hw = ctx.spec, ctx.hw
    if spec.pd == "off":
        return False
    if spec.backend != "sglang":
        if spec.pd == "on":
            raise PlanError(f"PD disaggregation is planned for the sglang backend only (backend {spec.backend}); "
                            "use --backend sglang or turn pd off")
        return False
    if spec.pd == "on":
        if spec.tp_size is not None:
            raise PlanError("pd=on and an explicit tp_size conflict: the PD split chooses each role's TP; "
                            "remove tp_size or turn pd off")
        if hw.count not in PD_GPU_COUNTS:
            raise PlanError(f"PD disaggregation splits 2, 4 or 8 GPUs; this machine has {hw.describe()}")
        if not hw.all_h100:
            ctx.warnings.append(f"PD forced on {hw.describe()}: seed 002's splits are tuned for H100s")
        ctx.decide("pd", "on", f"explicit{ctx.src('pd')}")
        return True
    if spec.tp_size is not None or not hw.all_h100 or hw.count not in PD_GPU_COUNTS:
        return False
    ctx.decide("pd", "auto -> on", f"all {hw.count} GPUs are H100, TP not set, ENABLE_PD_DEFAULTS not false (seed 002)")
    return True


@dataclass
class _Group:
    role: str
    tp: int
    groups: list[list[int]]
    check: MemoryCheck


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _split(ctx: _Ctx, role: str, gpus: list[int], seed_tp: int) -> tuple[_Group | None, list[str]]:
    """The seed's TP for this role if the model can use it and it fits, else the nearest valid one."""
    why_not: list[str] = []
    order = sorted(_divisors(len(gpus)), key=lambda t: (t != seed_tp, abs(t - seed_tp), -t))
    for tp in order:
        problem = tp_problem(ctx.mi, tp)
        if problem:
            why_not.append(f"TP{tp}: {problem}")
            continue
        check = ctx.memory(role, tp)
        if not check.fits:
            why_not.append(f"TP{tp}: does not fit ({check.describe()})")
            continue
        return _Group(role, tp, [gpus[i:i + tp] for i in range(0, len(gpus), tp)], check), why_not
    return None, why_not


def _pd_layout(ctx: _Ctx) -> tuple[_Group, _Group] | None:
    hw = ctx.hw
    (p_tp, p_rep), (d_tp, d_rep) = SEED_PD_SPLITS[hw.count]
    p_gpus = list(range(p_tp * p_rep))
    d_gpus = list(range(len(p_gpus), hw.count))
    groups = []
    for role, gpus, seed_tp, rep in (("prefill", p_gpus, p_tp, p_rep), ("decode", d_gpus, d_tp, d_rep)):
        seed_desc = f"{rep} x TP{seed_tp}" if rep > 1 else f"TP{seed_tp}"
        group, why_not = _split(ctx, role, gpus, seed_tp)
        if group is None:
            reason = (f"seed 002's {role} layout on {gpus_words(gpus)} is impossible for {ctx.mi.name}: "
                      + "; ".join(why_not))
            if ctx.spec.pd == "on":
                raise PlanError(reason)
            ctx.decide("pd", "off", reason + "; falling back to one unified engine")
            return None
        layout = ", ".join(gpu_ranges(g) for g in group.groups)
        if group.tp == seed_tp:
            ctx.decide(f"{role}_layout", f"{len(group.groups)} x TP{group.tp}" if len(group.groups) > 1
                       else f"TP{group.tp}", f"seed 002's split for {hw.count} H100s: {role} {seed_desc} on "
                       + (gpus_words(group.groups[0]) if len(group.groups) == 1 else f"GPUs {layout}"))
        else:
            reason = (f"seed 002's {role} {seed_desc} on {gpus_words(gpus)} replaced by "
                      f"{len(group.groups)} x TP{group.tp} on {'GPUs' if len(group.groups) > 1 else 'GPU'} {layout} "
                      "because " + "; ".join(why_not))
            ctx.decide(f"{role}_layout", f"{len(group.groups)} x TP{group.tp}", reason)
            ctx.warnings.append(reason)
        groups.append(group)
    return groups[0], groups[1]


def _pd_plan(ctx: _Ctx, s: EngineSettings, layout: tuple[_Group, _Group]) -> Plan:
    spec = ctx.spec
    prefill, decode = layout
    port = spec.engine_port
    router_port = port
    procs: list[Process] = []
    next_port = port + 1
    prefill_targets: list[tuple[str, int | None]] = []
    decode_urls: list[str] = []
    for i, gpus in enumerate(prefill.groups):
        bport = spec.pd_bootstrap_port + i
        argv = sglang_cmd.server_argv(s, role="prefill", tp_size=prefill.tp, port=next_port, bootstrap_port=bport,
                                      context_length=_ctx_len(ctx, s))
        p = Process(f"prefill-{i}", "prefill", gpus, prefill.tp, next_port, argv,
                    {"CUDA_VISIBLE_DEVICES": gpu_ranges_csv(gpus)}, bootstrap_port=bport, host=s.host)
        procs.append(p)
        prefill_targets.append((p.url, bport))
        next_port += 1
    for i, gpus in enumerate(decode.groups):
        argv = sglang_cmd.server_argv(s, role="decode", tp_size=decode.tp, port=next_port,
                                      context_length=_ctx_len(ctx, s))
        p = Process(f"decode-{i}", "decode", gpus, decode.tp, next_port, argv,
                    {"CUDA_VISIBLE_DEVICES": gpu_ranges_csv(gpus)}, host=s.host)
        procs.append(p)
        decode_urls.append(p.url)
        next_port += 1
    router = Process("router", "router", [], None, router_port,
                     sglang_cmd.router_argv(s, port=router_port, prefill=prefill_targets, decode=decode_urls),
                     {}, host=s.host)
    procs.insert(0, router)
    ctx.decide("pd_bootstrap_port", spec.pd_bootstrap_port,
               f"explicit{ctx.src('pd_bootstrap_port')}" if ctx.explicit("pd_bootstrap_port")
               else "default 8998 (DISAGG_BOOTSTRAP_PORT)")
    if spec.pd_ib_device:
        ctx.decide("pd_ib_device", spec.pd_ib_device, f"explicit{ctx.src('pd_ib_device')}")
    elif ctx.hw.ib_devices:
        ctx.decide("pd_ib_device", None, f"auto-detected by SGLang; this machine has {', '.join(ctx.hw.ib_devices)} "
                   "(pin with DISAGG_IB_DEVICE if the fabric needs it)")
    ctx.decide("router", f"port {router_port}", "sglang_router in PD mode sends each request to a prefill and a decode "
               "server" + (" (decode replicas round-robin)" if len(decode_urls) > 1 else ""))
    if s.speculative != "none":
        ctx.decide("speculative_roles", "prefill + decode", "the speculative flags go to both roles: the prefill "
                   "server runs the draft model once so decode starts drafting from the transferred state")
    for g in (prefill, decode):
        ctx.decide("memory", f"{g.role} TP {g.tp}", g.check.describe() + f"; room for about "
                   f"{g.check.kv_capacity_tokens:,} KV tokens")
    ctx.decide("mode", "pd", f"prefill on {_groups_words(prefill.groups)}, decode on {_groups_words(decode.groups)}; "
               "the KV cache moves from prefill to decode")
    return _finish(ctx, s, "pd", procs, router.url, spec.pd_bootstrap_port, [prefill.check, decode.check])


def _native_plan(ctx: _Ctx, s: EngineSettings) -> Plan:
    spec, hw, mi = ctx.spec, ctx.hw, ctx.mi
    tp = spec.tp_size or 1
    if spec.pd == "on":
        raise PlanError("PD disaggregation needs --backend sglang; the native engine is one process")
    arch_ok = mi.architecture in NATIVE_ARCHITECTURES or mi.model_type in NATIVE_ARCHITECTURES
    if not arch_ok:
        raise PlanError(f"the native engine serves Llama, Mistral, Qwen2 and Qwen3 models; {mi.name} is "
                        f"{mi.architecture}: use --backend sglang or vllm")
    if tp > 1:
        if not hw.cpu_only and tp > hw.count:
            raise PlanError(f"tp_size {tp}{ctx.src('tp_size')} needs {tp} GPUs; this machine has {hw.describe()}")
        if (problem := tp_problem(mi, tp)) is not None:
            raise PlanError(f"tp_size {tp}{ctx.src('tp_size')} is not possible for {mi.name}: {problem}; valid TP "
                            f"sizes: {', '.join(map(str, valid_tps(mi, max(hw.count, 8))))}")
        ctx.decide("tp_size", tp, f"explicit{ctx.src('tp_size')}: the native engine runs one process per rank "
                   + ("(gloo on CPU)" if hw.cpu_only else "(one per GPU, nccl)"))
    else:
        ctx.decide("tp_size", 1, "the native engine runs on one device unless tp_size is set")
    ctx.decide("mode", "unified", "the native engine is one worker; PD disaggregation needs --backend sglang")
    device = "cpu" if hw.cpu_only else "cuda"
    gpus = [] if hw.cpu_only else list(range(tp))
    checks = []
    if not hw.cpu_only:
        check = _check_tp(ctx, tp, "unified")
        checks.append(check)
        ctx.decide("memory", f"TP {tp}", check.describe())
        if hw.count > tp:
            ctx.warnings.append(f"GPUs {gpu_ranges(list(range(tp, hw.count)))} stay unused: the native engine uses "
                                f"{f'{tp} GPUs' if tp > 1 else 'one GPU'} (--tp-size); add replicas to use them")
    argv = [s.python, "-m", "fleetserve", "serve", "--model", s.model]
    if s.revision:
        argv += ["--revision", s.revision]
    if s.served_model_name:
        argv += ["--served-model-name", s.served_model_name]
    argv += ["--device", device, "--precision", s.precision, "--host", spec.host, "--port", str(spec.port)]
    if tp > 1:
        argv += ["--tp-size", str(tp)]
    if spec.max_model_len:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if s.max_total_tokens:
        argv += ["--kv-cache-tokens", str(s.max_total_tokens)]
    if s.max_queued_requests:
        argv += ["--max-queue-len", str(s.max_queued_requests)]
    if s.speculative and s.speculative != "none":
        argv += ["--speculative", s.speculative]
        for flag, value in (("--speculative-num-steps", s.speculative_num_steps),
                            ("--speculative-num-draft-tokens", s.speculative_num_draft_tokens),
                            ("--speculative-draft-model-path", s.speculative_draft_model_path)):
            if value is not None:
                argv += [flag, str(value)]
    argv += ["--log-level", s.log_level]
    env = {} if hw.cpu_only else {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
    proc = Process("worker", "unified", gpus, tp, spec.port, argv, env,
                   host="127.0.0.1" if spec.host in ("0.0.0.0", "::") else spec.host, ready_path="/readyz")
    for field in ("schedule_conservativeness", "mem_fraction_static"):
        if getattr(spec, field) is not None:
            ctx.warnings.append(f"{field} is an SGLang setting; the native engine does not use it")
    return _finish(ctx, s, "unified", [proc], proc.url, None, checks)


def _finish(ctx: _Ctx, s: EngineSettings, mode: str, procs: list[Process], entry: str, bootstrap: int | None,
            checks: list[MemoryCheck]) -> Plan:
    return Plan(backend=ctx.spec.backend, model=ctx.spec.model, hardware=ctx.hw.to_dict(),
                model_info=ctx.mi.to_dict(), settings=s, mode=mode, processes=procs, entry_url=entry,
                pd_bootstrap_port=bootstrap, memory=checks, decisions=ctx.decisions, warnings=ctx.warnings)
