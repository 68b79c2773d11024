"""`fleetserve plan`: print the launch plan for a model on this (or a described) machine; launch nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

EXIT_PLAN = 2

PLAN_HELP = """\
Show how a model would be served: GPUs, precision, tensor parallelism, PD disaggregation, speculative decoding and the exact engine command lines. Nothing is launched.

The planner detects this machine's GPUs (NVML or nvidia-smi), or plans for another machine with --gpu-type and --gpus. It reads the model's config.json (a local directory, the Hugging Face cache, or the Hub: config.json only, never weights). Every automatic choice comes with its reason. With --backend sglang on 2, 4 or 8 H100s and no --tp-size, prefill and decode run as separate engines behind SGLang's router (set ENABLE_PD_DEFAULTS=false or --pd off for one engine).

Settings also come from FLEETSERVE_<FIELD> variables, the seed names (MODEL_PATH, TP_SIZE, MAX_TOTAL_TOKENS, H100_ONLY, ENABLE_PD_DEFAULTS, DISAGG_BOOTSTRAP_PORT, DISAGG_IB_DEVICE, SPECULATIVE_ALGORITHM, SPECULATIVE_NUM_STEPS, SPECULATIVE_EAGLE_TOPK, SPECULATIVE_NUM_DRAFT_TOKENS, SPECULATIVE_TOKEN_MAP, SPECULATIVE_ATTENTION_MODE, SPECULATIVE_DRAFT_MODEL_PATH, LOG_LEVEL, PORT), DEPLOYMENT_CONFIG_JSON and a YAML file (--config); command-line flags win. Exit code 2 when no plan is possible, with the reason.
"""

PLAN_EPILOG = """\
[bold]Examples[/bold]

  fleetserve plan --model Qwen/Qwen2.5-7B-Instruct --backend sglang --gpu-type H100 --gpus 8

  fleetserve plan --model meta-llama/Llama-3.1-70B-Instruct --backend vllm --gpu-type A100 --gpus 8 -o json

  fleetserve plan -m ./Llama-3.1-8B-Instruct --backend sglang --gpu-type H100 --gpus 2 --speculative eagle --speculative-draft-model-path yuhuili/EAGLE-LLaMA3.1-Instruct-8B

  H100_ONLY=true fleetserve plan --backend sglang --model Qwen/Qwen2.5-7B-Instruct   [dim]# refuses non-H100 machines[/dim]
"""

_HW = "Hardware"
_ENGINE = "Engine"
_PD = "PD disaggregation"
_SPEC = "Speculative decoding"
_OUT = "Output"


def plan(
    model: Annotated[str | None, typer.Option("--model", "-m", help="'default', a local path (directory, config.json "
                                              "or .gguf) or a Hub id org/name. \\[default: default]")] = None,
    backend: Annotated[str | None, typer.Option(help="native | sglang | vllm. \\[default: native]",
                                                rich_help_panel=_ENGINE)] = None,
    gpu_type: Annotated[str | None, typer.Option(
        "--gpu-type", help="Plan for a machine with these GPUs (H100, H200, A100, A100-40GB, L4, A10G, B200, ...) "
        "instead of detecting this one.", rich_help_panel=_HW)] = None,
    gpus: Annotated[int | None, typer.Option("--gpus", help="Number of GPUs (with --gpu-type). \\[default: 1]",
                                             rich_help_panel=_HW)] = None,
    h100_only: Annotated[bool | None, typer.Option(
        "--h100-only/--no-h100-only", help="Refuse anything but H100 GPUs (env H100_ONLY).", rich_help_panel=_HW,
        show_default=False)] = None,
    tp_size: Annotated[int | None, typer.Option("--tp-size", help="Tensor parallel size. Setting it disables the "
                                                "automatic PD split. \\[default: chosen]",
                                                rich_help_panel=_ENGINE)] = None,
    precision: Annotated[str | None, typer.Option(
        "--precision", help="auto | bf16 | fp16 | fp32 | fp8. auto = FP8 weights + FP8 KV cache on H100/H200 "
        "(sglang, vllm), bf16 elsewhere. \\[default: auto]", rich_help_panel=_ENGINE)] = None,
    quantization: Annotated[str | None, typer.Option(help="Engine quantization method (fp8, awq, gptq, ...).",
                                                     rich_help_panel=_ENGINE)] = None,
    kv_cache_dtype: Annotated[str | None, typer.Option(help="KV cache dtype (auto, fp8_e5m2, fp8_e4m3, ...).",
                                                       rich_help_panel=_ENGINE)] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Longest request in tokens. \\[default: the model's]",
                                                      rich_help_panel=_ENGINE)] = None,
    max_total_tokens: Annotated[int | None, typer.Option(help="KV cache pool size in tokens (SGLang).",
                                                         rich_help_panel=_ENGINE)] = None,
    revision: Annotated[str | None, typer.Option(help="Hub branch, tag or commit.", rich_help_panel=_ENGINE)] = None,
    pd: Annotated[str | None, typer.Option("--pd", help="auto | on | off. \\[default: auto]",
                                           rich_help_panel=_PD)] = None,
    pd_bootstrap_port: Annotated[int | None, typer.Option(help="KV bootstrap port of the (first) prefill server. "
                                                          "\\[default: 8998]", rich_help_panel=_PD)] = None,
    pd_ib_device: Annotated[str | None, typer.Option(help="RDMA devices to pin, e.g. mlx5_0,mlx5_1.",
                                                     rich_help_panel=_PD)] = None,
    speculative: Annotated[str | None, typer.Option(help="none | eagle | eagle3 | ngram. \\[default: none]",
                                                    rich_help_panel=_SPEC)] = None,
    speculative_draft_model_path: Annotated[str | None, typer.Option(help="EAGLE draft model (Hub id or path).",
                                                                     rich_help_panel=_SPEC)] = None,
    speculative_num_steps: Annotated[int | None, typer.Option(help="\\[default: 2]", rich_help_panel=_SPEC)] = None,
    speculative_eagle_topk: Annotated[int | None, typer.Option(help="\\[default: 6]", rich_help_panel=_SPEC)] = None,
    speculative_num_draft_tokens: Annotated[int | None, typer.Option(help="\\[default: 10]",
                                                                     rich_help_panel=_SPEC)] = None,
    port: Annotated[int | None, typer.Option(help="fleetserve's own port. \\[default: 8000]",
                                             rich_help_panel=_OUT)] = None,
    engine_port: Annotated[int | None, typer.Option(help="First port of the engine processes. \\[default: 30000]",
                                                    rich_help_panel=_OUT)] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML file of settings.", dir_okay=False,
                                                rich_help_panel=_OUT)] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="table | json", rich_help_panel=_OUT)] = "table",
) -> None:
    from fleetserve.planner.build import build_plan
    from fleetserve.planner.spec import PlanConfigError, load_plan_spec
    from fleetserve.planner.types import PlanError

    err = Console(stderr=True)
    if output not in ("table", "json"):
        _fail(err, f"--output {output!r}: expected table or json")
    cli: dict[str, Any] = {
        "model": model, "backend": backend, "gpu_type": gpu_type, "gpu_count": gpus, "h100_only": h100_only,
        "tp_size": tp_size, "precision": precision, "quantization": quantization, "kv_cache_dtype": kv_cache_dtype,
        "max_model_len": max_model_len, "max_total_tokens": max_total_tokens, "revision": revision, "pd": pd,
        "pd_bootstrap_port": pd_bootstrap_port, "pd_ib_device": pd_ib_device, "speculative": speculative,
        "speculative_draft_model_path": speculative_draft_model_path, "speculative_num_steps": speculative_num_steps,
        "speculative_eagle_topk": speculative_eagle_topk, "speculative_num_draft_tokens": speculative_num_draft_tokens,
        "port": port, "engine_port": engine_port,
    }
    try:
        spec, sources, token = load_plan_spec(cli, config)
        result = build_plan(spec, sources, token)
    except (PlanConfigError, PlanError) as exc:
        _fail(err, str(exc))
        return
    if output == "json":
        data = result.to_dict()
        data["sources"] = {k: v for k, v in sources.items() if v != "default"}
        typer.echo(json.dumps(data, indent=2))
        return
    render_plan(result, Console())


def _fail(err: Console, message: str) -> None:
    err.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_PLAN)


def render_plan(p, console: Console) -> None:
    """Rich tables: summary, processes (role, GPUs, TP, port, command), decisions with reasons, warnings."""
    from rich.table import Table

    s = p.settings
    hw = p.hardware
    console.print(f"[bold]fleetserve plan[/bold]  backend [cyan]{p.backend}[/cyan]  model [cyan]{escape(p.model)}"
                  f"[/cyan]  on {escape(hw['description'])}", highlight=False, soft_wrap=True)
    spec_text = "off" if s.speculative == "none" else s.speculative.upper()
    console.print(f"mode [bold]{p.mode}[/bold]  precision {s.precision}  quantization {s.quantization or '-'}  "
                  f"kv cache {s.kv_cache_dtype or 'auto'}  max_model_len {s.max_model_len}  speculative {spec_text}"
                  + (f"  bootstrap port {p.pd_bootstrap_port}" if p.pd_mode else "")
                  + f"  entry {p.entry_url}", highlight=False, soft_wrap=True)
    table = Table(title="processes", title_justify="left", show_lines=True, expand=True)
    table.add_column("name", style="cyan", no_wrap=True)
    table.add_column("role", no_wrap=True)
    table.add_column("GPUs", no_wrap=True)
    table.add_column("TP", justify="right", no_wrap=True)
    table.add_column("port", justify="right", no_wrap=True)
    table.add_column("command", overflow="fold", ratio=1)
    for proc in p.processes:
        table.add_row(proc.name, proc.role, ",".join(map(str, proc.gpus)) or "-",
                      str(proc.tp_size) if proc.tp_size else "-", str(proc.port), escape(proc.command))
    console.print(table)
    decisions = Table(title="decisions", title_justify="left", expand=True)
    decisions.add_column("setting", style="cyan", no_wrap=True)
    decisions.add_column("value", no_wrap=True)
    decisions.add_column("reason", overflow="fold", ratio=1)
    for d in p.decisions:
        decisions.add_row(d.setting, escape(str(d.value)), escape(d.reason))
    console.print(decisions)
    for w in p.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}", highlight=False, soft_wrap=True)
