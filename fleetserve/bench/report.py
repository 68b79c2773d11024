"""Results out: rich tables, the versioned JSON document (schema in docs/bench.md) and PNG plots."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table

from fleetserve.bench import SCHEMA_VERSION
from fleetserve.bench.metrics import DISTRIBUTIONS, STAT_KEYS, output_timeline

if TYPE_CHECKING:
    from fleetserve.bench.runner import BenchResult, LevelResult

_DIST_NAMES = {"ttft_ms": "TTFT", "tpot_ms": "TPOT", "itl_ms": "ITL", "e2e_ms": "E2E"}
_THROUGHPUT_ROWS = (
    ("completed", "Completed requests", "{:d}"),
    ("failed", "Failed requests", "{:d}"),
    ("duration_s", "Duration (s)", "{:.2f}"),
    ("total_input_tokens", "Input tokens", "{:d}"),
    ("total_output_tokens", "Output tokens", "{:d}"),
    ("request_throughput", "Request throughput (req/s)", "{:.3f}"),
    ("input_throughput", "Input throughput (tok/s)", "{:.1f}"),
    ("output_throughput", "Output throughput (tok/s)", "{:.1f}"),
    ("total_token_throughput", "Total throughput (tok/s)", "{:.1f}"),
    ("good_requests", "Requests meeting SLOs", "{:d}"),
    ("goodput", "Goodput (req/s)", "{:.3f}"),
    ("cached_tokens", "Cached prompt tokens (reported)", "{:d}"),
)


def _fmt(value: Any, spec: str = "{:.1f}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and "d" in spec:
        return f"{value:.0f}"
    return spec.format(value)


def _ms(value: float | None) -> str:
    """Latencies: one decimal, none from 10 s up (keeps columns narrow)."""
    return _fmt(value, "{:.0f}" if value is not None and value >= 10_000 else "{:.1f}")


def _table(title: str, **kw) -> Table:
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, **kw)


def _errors(summary: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in summary["errors"].items()) or "-"


def _level_title(result: BenchResult, lr: LevelResult) -> str:
    where = "offline engine" if result.mode == "offline" else result.targets[0]["url"]
    return f"fleetserve bench: {lr.level.label()} ({where})"


def _single_tables(result: BenchResult, lr: LevelResult) -> list[Table]:
    s = lr.summaries["A"]
    t = _table(_level_title(result, lr), min_width=60)
    t.add_column("Metric")
    t.add_column("Value", justify="right")
    for key, name, spec in _THROUGHPUT_ROWS:
        if s.get(key) is None and key in ("good_requests", "goodput", "cached_tokens"):
            continue
        t.add_row(name, _fmt(s.get(key), spec))
    if s["failed"]:
        t.add_row("Errors", _errors(s))
    lat = _table("Latency (ms)")
    lat.add_column("Metric")
    for k in ("count", *STAT_KEYS):
        lat.add_column(k, justify="right")
    for d in DISTRIBUTIONS:
        dist = s[d]
        lat.add_row(_DIST_NAMES[d], str(dist["count"]), *(_ms(dist[k]) for k in STAT_KEYS))
    return [t, lat]


def _compare_table(result: BenchResult, lr: LevelResult) -> Table:
    a, b = lr.summaries["A"], lr.summaries["B"]
    ta, tb = result.targets[0], result.targets[1]
    legend = [f"A = {ta['url']} ({ta['model']})", f"B = {tb['url']} ({tb['model']})"]
    t = _table(f"fleetserve bench A/B: {lr.level.label()}", caption="\n".join(legend), caption_justify="left",
               min_width=max(52, *(len(line) for line in legend)))
    t.add_column("Metric")
    t.add_column("A", justify="right")
    t.add_column("B", justify="right")
    t.add_column("B/A", justify="right")
    ratio = lr.ratios or {}
    for key, name, spec in _THROUGHPUT_ROWS:
        if a.get(key) is None and b.get(key) is None and key in ("good_requests", "goodput", "cached_tokens"):
            continue
        t.add_row(name, _fmt(a.get(key), spec), _fmt(b.get(key), spec), _fmt(ratio.get(key), "{:.3f}"))
    if a["failed"] or b["failed"]:
        t.add_row("Errors", _errors(a), _errors(b), "")
    for d in DISTRIBUTIONS:
        for k in STAT_KEYS:
            t.add_row(f"{_DIST_NAMES[d]} {k} (ms)", _ms(a[d][k]), _ms(b[d][k]), _fmt(ratio.get(f"{d}.{k}"), "{:.3f}"))
    return t


def _sweep_tables(result: BenchResult) -> list[Table]:
    """One row per level: a throughput table and a latency table."""
    where = "offline engine" if result.mode == "offline" else result.targets[0]["url"]
    with_slo = result.config.slo is not None
    t = _table(f"fleetserve bench sweep ({where})")
    for c in ("Level", "OK", "Failed", "req/s", "in tok/s", "out tok/s", *(("goodput",) if with_slo else ())):
        t.add_column(c, justify="left" if c == "Level" else "right")
    lat = _table("Latency per level (ms)")
    lat.add_column("Level")
    for d in DISTRIBUTIONS:
        for k in ("p50", "p99"):
            lat.add_column(f"{_DIST_NAMES[d]} {k}", justify="right")
    for lr in result.levels:
        s = lr.summaries["A"]
        row = [lr.level.short(), str(s["completed"]), str(s["failed"]), _fmt(s["request_throughput"], "{:.3f}"),
               _fmt(s["input_throughput"]), _fmt(s["output_throughput"])]
        if with_slo:
            row.append(_fmt(s["goodput"], "{:.3f}"))
        t.add_row(*row)
        lat.add_row(lr.level.short(), *(_ms(s[d][k]) for d in DISTRIBUTIONS for k in ("median", "p99")))
    return [t, lat]


def tables(result: BenchResult) -> list[Table]:
    """Compare: one A/B table per level; one level: metric and latency tables; a sweep: one row per level."""
    if len(result.targets) == 2:
        return [_compare_table(result, lr) for lr in result.levels]
    if len(result.levels) == 1:
        return _single_tables(result, result.levels[0])
    return _sweep_tables(result)


def print_report(result: BenchResult, console: Console | None = None) -> None:
    console = console or Console()
    for table in tables(result):
        console.print(table)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- JSON


def _clean(value: Any) -> Any:
    """JSON has no inf/nan: inf becomes the string "inf", nan null."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _config_dict(result: BenchResult) -> dict[str, Any]:
    cfg = result.config
    out = {
        "endpoint": cfg.endpoint, "dataset": cfg.dataset, "tokenizer": cfg.tokenizer,
        "num_prompts": cfg.num_prompts if cfg.duration is None else None, "duration_s": cfg.duration,
        "warmup": cfg.warmup, "seed": cfg.seed, "burstiness": cfg.burstiness, "ignore_eos": cfg.ignore_eos,
        "temperature": cfg.temperature, "timeout_s": cfg.timeout, "slo": cfg.slo.as_dict() if cfg.slo else None,
        "levels": [lv.as_dict() for lv in cfg.levels], "rounds": cfg.rounds if cfg.compare else None,
        "extra_body": cfg.extra_body or None,
    }
    return out


def _request_dict(rec, t0: float) -> dict[str, Any]:
    d = asdict(rec)
    d["start"] = rec.start - t0
    d["end"] = rec.end - t0
    d["chunk_times"] = [t - t0 for t in rec.chunk_times]
    d["ttft_ms"] = rec.ttft * 1000 if rec.ttft is not None else None
    d["tpot_ms"] = rec.tpot * 1000 if rec.tpot is not None else None
    d["e2e_ms"] = rec.e2e * 1000
    return d


def to_json(result: BenchResult, detailed: bool = False) -> dict[str, Any]:
    """The results document, ``schema_version`` 1 (see docs/bench.md)."""
    from fleetserve import __version__

    levels = []
    for lr in result.levels:
        entry: dict[str, Any] = {**lr.level.as_dict(), "results": lr.summaries, "ratios": lr.ratios}
        if detailed:
            entry["requests"] = {label: [_request_dict(r, lr.t0) for r in sorted(run.records, key=lambda r: r.start)]
                                 for label, run in lr.runs.items()}
        levels.append(entry)
    return _clean({
        "schema_version": SCHEMA_VERSION,
        "tool": "fleetserve bench",
        "fleetserve_version": __version__,
        "started_at": result.started_at,
        "mode": result.mode,
        "config": _config_dict(result),
        "workload": result.workload,
        "endpoints": result.targets,
        "engine": result.engine,
        "levels": levels,
        "warnings": result.warnings,
    })


def write_json(result: BenchResult, path: Path, detailed: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(result, detailed), indent=2) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- plots


def _series(result: BenchResult):
    """(label, LevelResult, endpoint label, EndpointRun) for every curve."""
    multi_level, multi_ep = len(result.levels) > 1, len(result.targets) > 1
    for lr in result.levels:
        for ep, run in lr.runs.items():
            parts = []
            if multi_level:
                parts.append(lr.level.label())
            if multi_ep or not parts:
                target = next(t for t in result.targets if t["label"] == ep)
                parts.append(f"{ep}: {target['url'] or 'offline'}" if multi_ep else (target["url"] or "offline"))
            yield ", ".join(parts), lr, ep, run


def write_plots(result: BenchResult, out_dir: Path) -> list[Path]:
    """latency_cdf.png, throughput.png and (sweeps) sweep.png in ``out_dir``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, d in zip(axes.flat, DISTRIBUTIONS):
        for name, _lr, _ep, run in _series(result):
            ok = [r for r in run.records if r.success]
            if d == "ttft_ms":
                vals = [r.ttft * 1000 for r in ok if r.ttft is not None]
            elif d == "tpot_ms":
                vals = [r.tpot * 1000 for r in ok if r.tpot is not None]
            elif d == "itl_ms":
                vals = [g * 1000 for r in ok for g in r.itls]
            else:
                vals = [r.e2e * 1000 for r in ok]
            if vals:
                xs = np.sort(vals)
                ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=name)
        ax.set_title(f"{_DIST_NAMES[d]} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of " + ("gaps" if d == "itl_ms" else "requests"))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "latency_cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, lr, _ep, run in _series(result):
        xs, ys = output_timeline(run.records, lr.t0)
        # A/B: bins where this endpoint was not under load (the other one's rounds) are gaps, not zeros
        blocks = [(b0 - lr.t0, b1 - lr.t0) for b0, b1 in run.blocks]
        ys = [y if any(x < b1 and x + 1.0 > b0 for b0, b1 in blocks) else math.nan for x, y in zip(xs, ys)]
        if xs:
            ax.step(xs, ys, where="post", label=name)
    ax.set_title("Output tokens/s over time (1 s bins)")
    ax.set_xlabel("seconds since the level started")
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    if len(result.levels) > 1:
        paths.append(_sweep_plot(result, out_dir, plt))
    return paths


def _sweep_plot(result: BenchResult, out_dir: Path, plt) -> Path:
    """Throughput and p50/p99 TTFT/TPOT per level: one point per level, one curve per endpoint."""
    xs = list(range(len(result.levels)))
    names = [lr.level.label().replace(", ", "\n") for lr in result.levels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for t in result.targets:
        ep = t["label"]
        sums = [lr.summaries[ep] for lr in result.levels]
        tag = f"{ep} " if len(result.targets) > 1 else ""
        ax1.plot(xs, [s["output_throughput"] or 0 for s in sums], marker="o", label=f"{tag}output tok/s")
        for d in ("ttft_ms", "tpot_ms"):
            ax2.plot(xs, [s[d]["median"] or math.nan for s in sums], marker="o", label=f"{tag}{_DIST_NAMES[d]} p50")
            ax2.plot(xs, [s[d]["p99"] or math.nan for s in sums], marker="x", linestyle="--",
                     label=f"{tag}{_DIST_NAMES[d]} p99")
    for ax, title, ylabel in ((ax1, "Throughput per level", "tokens/s"), (ax2, "Latency per level", "ms")):
        ax.set_title(title)
        ax.set_xticks(xs, names, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
