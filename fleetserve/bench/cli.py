"""`fleetserve bench`: the typer command. Only typer and rich load at import time (`fleetserve --help`
stays instant); the benchmark's modules load when the command runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

EXIT_CONFIG = 2  # bad flags / cannot start (as `serve`)
EXIT_FAILED = 1  # the benchmark ran but an endpoint completed no request

BENCH_HELP = """\
Benchmark an OpenAI-compatible server (or fleetserve's engine in-process) under a realistic load.

Sends streaming requests to URL/v1/completions (or /v1/chat/completions with --endpoint chat) and measures, per request, TTFT (time to the first output chunk), TPOT ((end-to-end - TTFT) / (output tokens - 1)), ITL (every gap between output chunks) and end-to-end latency; then reports each as mean, median, p90, p95, p99 and max (percentiles use numpy's linear interpolation), with request, input and output token throughput, goodput under --slo, and failed requests by type (http_<status>, timeout, connection_error, stream_error, invalid_response). Token counts come from the server's usage chunk (stream_options.include_usage) or, when a server sends none, from --tokenizer.

[bold]Workloads[/bold] (--dataset). random: prompts of exactly --input-len tokens (re-encoded and checked; sent as token ids on the completions endpoint), --range-ratio R draws lengths uniformly from ±R around the given ones. sharegpt: a ShareGPT JSON file (--dataset-path); the first human turn is the prompt, the reply's token count the output length unless --output-len. prompts: a JSONL file of {"prompt": ..., "output_len": N}. shared-prefix: --num-groups long system prompts of --prefix-len tokens, each request adding a --suffix-len question: shows what prefix caching buys. --ignore-eos (sends ignore_eos and min_tokens) makes every request produce exactly its output length.

[bold]Load[/bold]. --concurrency caps requests in flight; --request-rate sends requests as a Poisson process (gamma with shape --burstiness: below 1 burstier, above 1 more regular; inf = all at once). Both take comma lists for a sweep: one table row, one curve and one JSON entry per level. --num-prompts requests per level, or --duration seconds per level (then requests in flight finish). --warmup requests run first and are not counted. The same --seed gives the same prompts and arrival times.

[bold]A/B[/bold]. --compare URL2 sends the same requests to both servers in --rounds alternating rounds (A then B, B then A, ...) so drifts of the machine hit both alike and the servers never compete with each other; every metric is shown side by side with the ratio B/A.

[bold]Offline[/bold]. --offline loads the model (--model is then a model spec: 'default', a path or a Hub id) into fleetserve's native engine in this process, exactly as `fleetserve serve` would, and runs the same workload without HTTP: the engine's own throughput and latencies.

Results: a live progress bar, tables, --output FILE (JSON, "schema_version": 1, documented in docs/bench.md) and --plot DIR (latency CDFs, output tokens/s over time, per-level curves). Exit status: 0, 1 if an endpoint completed no request at some level, 2 for bad flags or an unreachable server.
"""

BENCH_EPILOG = """\
[bold]Examples[/bold]

  fleetserve bench --url http://127.0.0.1:8000 --num-prompts 200 --input-len 512 --output-len 128

  fleetserve bench --url http://127.0.0.1:8000 --concurrency 1,4,16,64 --ignore-eos --output sweep.json --plot plots/

  fleetserve bench --url http://127.0.0.1:8000 --request-rate 1,2,4 --burstiness 0.5 --slo ttft_ms=500,tpot_ms=50

  fleetserve bench --url http://127.0.0.1:8000 --endpoint chat --dataset sharegpt --dataset-path ShareGPT_V3.json

  fleetserve bench --url http://127.0.0.1:8000 --dataset shared-prefix --num-groups 4 --prefix-len 1024 --suffix-len 32

  fleetserve bench --url http://127.0.0.1:8000 --compare http://127.0.0.1:8001 --concurrency 4 --ignore-eos  [dim]# A/B[/dim]

  fleetserve bench --offline --model default --concurrency 16 --num-prompts 64 --input-len 128 --output-len 64

  fleetserve bench --url http://127.0.0.1:8000 --duration 60 --concurrency 8 --prompt-len 256 --output-len 64  [dim]# seed 003's `benchmark` flags[/dim]
"""

_TARGET = "Target"
_WORKLOAD = "Workload"
_LOAD = "Load"
_OUTPUT = "Metrics and output"
_COMPARE = "A/B comparison"
_OFFLINE = "Offline engine (--offline)"


def _err(message: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)


def bench(
    url: Annotated[str | None, typer.Option(
        help="Base URL of the server under test (http://host:port, with or without /v1).",
        rich_help_panel=_TARGET)] = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Model name sent in requests \\[default: the first id of GET /v1/models]. With "
        "--offline: the model spec to load ('default', a path or a Hub id) \\[default: default].",
        rich_help_panel=_TARGET)] = None,
    api_key: Annotated[str | None, typer.Option(
        help="Bearer key for --url (never printed).", envvar="FLEETSERVE_BENCH_API_KEY",
        rich_help_panel=_TARGET)] = None,
    endpoint: Annotated[str, typer.Option(
        help="completions (/v1/completions) or chat (/v1/chat/completions).", rich_help_panel=_TARGET)] = "completions",
    tokenizer: Annotated[str, typer.Option(
        help="Model spec whose tokenizer builds prompts and counts tokens when a server sends no usage: "
        "'default', a local path or a Hub id. Use the served model's (--offline uses the model's own).",
        rich_help_panel=_TARGET)] = "default",
    timeout: Annotated[float, typer.Option(
        help="Seconds one request may take before it counts as failed (timeout).", rich_help_panel=_TARGET)] = 600.0,
    dataset: Annotated[str, typer.Option(
        help="random | sharegpt | prompts | shared-prefix.", rich_help_panel=_WORKLOAD)] = "random",
    dataset_path: Annotated[Path | None, typer.Option(
        help="The file for --dataset sharegpt (JSON) or prompts (JSONL).", rich_help_panel=_WORKLOAD)] = None,
    input_len: Annotated[int, typer.Option(
        "--input-len", "--prompt-len", help="random: prompt tokens per request (--prompt-len is an alias).",
        rich_help_panel=_WORKLOAD)] = 1024,
    output_len: Annotated[int | None, typer.Option(
        help="max_tokens per request \\[default: 128; sharegpt: the reply's length; prompts: each line's output_len].",
        rich_help_panel=_WORKLOAD)] = None,
    range_ratio: Annotated[float, typer.Option(
        help="random: draw input/output lengths uniformly from [L*(1-R), L*(1+R)] (0 = exact).",
        rich_help_panel=_WORKLOAD)] = 0.0,
    num_groups: Annotated[int, typer.Option(help="shared-prefix: number of shared system prompts.",
                                            rich_help_panel=_WORKLOAD)] = 4,
    prefix_len: Annotated[int, typer.Option(help="shared-prefix: tokens of each shared system prompt.",
                                            rich_help_panel=_WORKLOAD)] = 512,
    suffix_len: Annotated[int, typer.Option(help="shared-prefix: tokens of each request's own question.",
                                            rich_help_panel=_WORKLOAD)] = 32,
    ignore_eos: Annotated[bool, typer.Option(
        "--ignore-eos", help="Send ignore_eos: true and min_tokens = max_tokens so every request produces exactly "
        "its output length (fleetserve, vLLM and SGLang honour them).", rich_help_panel=_WORKLOAD)] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature sent with every request (0 = greedy).",
                                               rich_help_panel=_WORKLOAD)] = 0.0,
    extra_body: Annotated[str | None, typer.Option(
        help='JSON object merged into every request body, e.g. \'{"top_k": 20}\'.', rich_help_panel=_WORKLOAD)] = None,
    concurrency: Annotated[str | None, typer.Option(
        metavar="N[,N...]", help="Most requests in flight; a comma list runs one level per value \\[default: "
        "unlimited].", rich_help_panel=_LOAD)] = None,
    request_rate: Annotated[str | None, typer.Option(
        metavar="R[,R...]", help="Mean requests per second (Poisson/gamma arrivals); inf = all at once; a comma "
        "list runs one level per value \\[default: inf].", rich_help_panel=_LOAD)] = None,
    burstiness: Annotated[float, typer.Option(
        help="Gamma shape of the arrival gaps: 1 = Poisson, <1 burstier, >1 more regular.",
        rich_help_panel=_LOAD)] = 1.0,
    num_prompts: Annotated[int, typer.Option(help="Requests per level (and per endpoint).",
                                             rich_help_panel=_LOAD)] = 100,
    duration: Annotated[float | None, typer.Option(
        help="Seconds to send requests per level instead of --num-prompts (needs --concurrency or a finite "
        "--request-rate).", rich_help_panel=_LOAD)] = None,
    warmup: Annotated[int, typer.Option(help="Warm-up requests per endpoint before measuring (not counted).",
                                        rich_help_panel=_LOAD)] = 1,
    seed: Annotated[int, typer.Option(help="Seed of prompts and arrival times.", rich_help_panel=_LOAD)] = 0,
    slo: Annotated[str | None, typer.Option(
        metavar="KEY=MS,...", help="Service-level objectives for goodput: any of ttft_ms, tpot_ms, e2e_ms, e.g. "
        "ttft_ms=500,tpot_ms=50. Goodput = requests meeting all of them per second.",
        rich_help_panel=_OUTPUT)] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the results as JSON (schema_version 1, see docs/bench.md).",
        rich_help_panel=_OUTPUT)] = None,
    plot: Annotated[Path | None, typer.Option(
        metavar="DIR", help="Write latency_cdf.png, throughput.png (and sweep.png for sweeps) into DIR.",
        rich_help_panel=_OUTPUT)] = None,
    detailed: Annotated[bool, typer.Option(
        "--detailed", help="Also put every request's record (timestamps, tokens, error) in the JSON.",
        rich_help_panel=_OUTPUT)] = False,
    progress: Annotated[bool, typer.Option(
        "--progress/--no-progress", help="Show the live progress bar.", rich_help_panel=_OUTPUT)] = True,
    compare: Annotated[str | None, typer.Option(
        metavar="URL2", help="Second server (B): the same requests go to both in alternating rounds.",
        rich_help_panel=_COMPARE)] = None,
    model2: Annotated[str | None, typer.Option(
        help="Model name for B \\[default: the first id of B's /v1/models].", rich_help_panel=_COMPARE)] = None,
    api_key2: Annotated[str | None, typer.Option(
        help="Bearer key for B (A's key is never sent to B).", envvar="FLEETSERVE_BENCH_API_KEY2",
        rich_help_panel=_COMPARE)] = None,
    rounds: Annotated[int, typer.Option(
        help="Alternating rounds per level when comparing (A B, B A, ...).", rich_help_panel=_COMPARE)] = 4,
    offline: Annotated[bool, typer.Option(
        "--offline", help="Run fleetserve's native engine in this process instead of calling a URL.",
        rich_help_panel=_OFFLINE)] = False,
    precision: Annotated[str, typer.Option(
        "--precision", "--dtype", help="auto | fp32 | bf16 | fp16 (auto: fp32 on CPU, bf16 on CUDA).",
        rich_help_panel=_OFFLINE)] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps.", rich_help_panel=_OFFLINE)] = "auto",
    max_batch_tokens: Annotated[int | None, typer.Option(
        help="Engine token budget per step \\[default: serve's, 2048].", rich_help_panel=_OFFLINE)] = None,
    max_running_seqs: Annotated[int | None, typer.Option(
        help="Most sequences the engine runs at once \\[default: serve's, 64].", rich_help_panel=_OFFLINE)] = None,
    max_model_len: Annotated[int | None, typer.Option(
        help="Longest prompt + output \\[default: the model's context length].", rich_help_panel=_OFFLINE)] = None,
    kv_cache_tokens: Annotated[int | None, typer.Option(
        help="KV pool size in tokens \\[default: sized from memory].", rich_help_panel=_OFFLINE)] = None,
) -> None:
    """The help text is BENCH_HELP."""
    from fleetserve.bench.arrival import parse_levels
    from fleetserve.bench.client import ENDPOINTS, BenchSetupError
    from fleetserve.bench.datasets import DATASETS, DatasetError
    from fleetserve.bench.metrics import SLO
    from fleetserve.bench.offline import OfflineSettings
    from fleetserve.bench.report import print_report, write_json, write_plots
    from fleetserve.bench.runner import BenchConfig, run
    from fleetserve.logs import register_secret

    for key in (api_key, api_key2):
        if key:
            register_secret(key)
    try:
        if plot is not None:  # fail before a long run, not after it
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ValueError("--plot needs matplotlib: pip install 'fleetserve[bench]'") from None
        if endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
        if dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
        body = json.loads(extra_body) if extra_body else {}
        if not isinstance(body, dict):
            raise ValueError(f"--extra-body must be a JSON object, got {extra_body}")  # noqa: TRY004 (a usage error)
        cfg = BenchConfig(
            url=url, model=None if offline else model, api_key=api_key, endpoint=endpoint, tokenizer=tokenizer,
            dataset=dataset, dataset_path=str(dataset_path) if dataset_path else None, input_len=input_len,
            output_len=output_len, range_ratio=range_ratio, num_groups=num_groups, prefix_len=prefix_len,
            suffix_len=suffix_len, levels=parse_levels(concurrency, request_rate), burstiness=burstiness,
            num_prompts=num_prompts, duration=duration, warmup=warmup, seed=seed, slo=SLO.parse(slo),
            timeout=timeout, ignore_eos=ignore_eos, temperature=temperature, extra_body=body, compare=compare,
            model2=model2, api_key2=api_key2, rounds=rounds, offline=offline, progress=progress,
            offline_settings=OfflineSettings(model=model or "default", precision=precision, device=device,
                                             max_batch_tokens=max_batch_tokens, max_running_seqs=max_running_seqs,
                                             max_model_len=max_model_len, kv_cache_tokens=kv_cache_tokens)
            if offline else None)
        result = run(cfg)
    except json.JSONDecodeError as exc:
        _err(f"--extra-body is not valid JSON: {exc}")
        raise typer.Exit(EXIT_CONFIG) from None
    except (ValueError, BenchSetupError, DatasetError) as exc:
        _err(str(exc))
        raise typer.Exit(EXIT_CONFIG) from None
    console = Console()
    print_report(result, console)
    if output is not None:
        console.print(f"results: {escape(str(write_json(result, output, detailed)))}", highlight=False)
    if plot is not None:
        for path in write_plots(result, plot):
            console.print(f"plot: {escape(str(path))}", highlight=False)
    if any(s["completed"] == 0 for lr in result.levels for s in lr.summaries.values()):
        _err("an endpoint completed no request at some level; see the errors above")
        raise typer.Exit(EXIT_FAILED)
