"""Soak test: N concurrent streaming clients for a fixed time against a worker or a platform gateway, then the
checks that catch leaks a short test cannot.

    python benchmarks/soak.py --url http://127.0.0.1:8000 --duration 600             # one worker
    python benchmarks/soak.py --url http://127.0.0.1:8080 --deployment chat \\
        --api-key $FLEETSERVE_API_KEY --duration 600                                # through the gateway
    python benchmarks/soak.py --url ... --duration 60 --json soak.json                 # CI: 1 minute

Each client loops: a streaming chat or completion request (prompts and lengths vary; a few clients hang up
mid-stream on purpose, to exercise aborts), read to `[DONE]`, again. Meanwhile the worker processes are
sampled (RSS, open file descriptors) and their /metrics scraped (KV usage, running, waiting).

Criteria (exit 1 when one fails, 2 when the target cannot be reached):
  errors            requests that failed other than with 429 (HTTP errors, SSE error events, streams cut
                    without [DONE], timeouts): must be 0
  rss growth        mean RSS of the last fifth of the run vs. the first fifth after warm-up: < --max-rss-growth
  kv after          fleetserve_kv_cache_usage (and running + waiting) back to 0 within --settle-s after the run
  fds after         open file descriptors back to the pre-run baseline (+ --fd-slack) within --settle-s
  p99               reported; a criterion only with --max-p99-s

Worker processes: with --deployment, the deployment's replicas (pids and URLs from the platform's API);
otherwise the process listening on --url's port (or --pid). Run this on the machine the workers run on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import httpx
import psutil
from rich.console import Console
from rich.table import Table

PROMPTS = ["Once upon a time", "The history of the city begins", "Write a haiku about rain.",
           "List three primary colours and explain each.", "Why is the sky blue?", "Explain what a prime number is.",
           "Tell me about the ocean.", "Describe a busy market square in the morning."]


@dataclass
class Target:
    name: str  # replica id or "worker"
    url: str  # where its /metrics are
    pid: int | None


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss_mb: dict[str, float] = field(default_factory=dict)
    fds: dict[str, int] = field(default_factory=dict)
    kv_usage: dict[str, float] = field(default_factory=dict)
    running: dict[str, float] = field(default_factory=dict)
    waiting: dict[str, float] = field(default_factory=dict)


@dataclass
class Tally:
    ok: int = 0
    rejected_429: int = 0
    cancelled: int = 0  # hung up on purpose
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # e2e seconds of ok requests
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_examples) < 10:
            self.error_examples.append(what[:300])


# ---- targets and probes --------------------------------------------------------------------------------


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def discover(url: str, deployment: str | None, api_key: str | None, pids: list[int]) -> tuple[list[Target], str]:
    """The worker processes to watch and the `model` to send."""
    with httpx.Client(timeout=10, headers=_headers(api_key)) as c:
        if deployment:
            d = c.get(f"{url}/api/v1/deployments/{deployment}")
            d.raise_for_status()
            reps = [r for r in d.json()["replicas"] if r["status"] == "ready"]
            if not reps:
                raise RuntimeError(f"deployment {deployment} has no ready replica")
            return [Target(r["id"], r["url"], r["pid"]) for r in reps], deployment
        model = c.get(f"{url}/v1/models").json()["data"][0]["id"]
    if not pids:
        port = urlsplit(url).port
        pids = sorted({conn.pid for conn in psutil.net_connections(kind="tcp")
                       if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid})
    if not pids:
        print(f"warning: no local process listens on port {urlsplit(url).port}; RSS and fds not sampled "
              "(give --pid)", file=sys.stderr)
    return [Target("worker" if len(pids) < 2 else f"worker-{p}", url, p) for p in pids or [None]], model


def _gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def probe(targets: list[Target], t: float, api_key: str | None) -> Sample:
    s = Sample(t)
    for tg in targets:
        if tg.pid:
            try:
                p = psutil.Process(tg.pid)
                s.rss_mb[tg.name] = p.memory_info().rss / 2**20
                s.fds[tg.name] = p.num_fds()
            except psutil.Error:
                pass
        try:  # a new connection each time: the probe must not hold a file descriptor of the worker open
            text = httpx.get(f"{tg.url}/metrics", timeout=10, headers={**_headers(api_key), "Connection": "close"}).text
            s.kv_usage[tg.name] = _gauge(text, "fleetserve_kv_cache_usage")
            s.running[tg.name] = _gauge(text, "fleetserve_num_requests_running")
            s.waiting[tg.name] = _gauge(text, "fleetserve_num_requests_waiting")
        except httpx.HTTPError:
            pass
    return s


# ---- load -------------------------------------------------------------------------------------------


async def client_loop(i: int, c: httpx.AsyncClient, url: str, model: str, args, stop_at: float, tally: Tally):
    rng = random.Random(args.seed * 1000 + i)
    while time.monotonic() < stop_at:
        chat = rng.random() < 0.5
        prompt = f"{rng.choice(PROMPTS)} (client {i}, request {rng.randrange(10**6)})"
        body = {"model": model, "stream": True, "max_tokens": rng.randint(max(1, args.max_tokens // 4), args.max_tokens),
                "temperature": rng.choice([0.0, 0.7, 1.0]), "stream_options": {"include_usage": True}}
        body |= {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
        path = "/v1/chat/completions" if chat else "/v1/completions"
        hang_up_after = rng.randint(1, 4) if rng.random() < args.cancel_fraction else None
        start = time.monotonic()
        ttft = None
        events = 0
        try:
            async with c.stream("POST", f"{url}{path}", json=body) as r:
                if r.status_code == 429:
                    tally.rejected_429 += 1
                    await r.aread()
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")) * rng.random())
                    continue
                if r.status_code != 200:
                    tally.error(f"HTTP {r.status_code} on {path}: {(await r.aread()).decode(errors='replace')}")
                    continue
                last = None
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    events += 1
                    if ttft is None:
                        ttft = time.monotonic() - start
                    if data != "[DONE]" and '"error"' in data and data.startswith('{"error"'):
                        tally.error(f"SSE error event on {path}: {data}")
                        last = "error"
                        break
                    if data.startswith('{') and '"usage"' in data:
                        usage = json.loads(data).get("usage")
                        if usage:
                            tally.tokens += usage.get("completion_tokens", 0)
                    last = data
                    if hang_up_after is not None and events >= hang_up_after:
                        break
                if hang_up_after is not None and last not in ("[DONE]", "error"):
                    tally.cancelled += 1
                elif last == "[DONE]":
                    tally.ok += 1
                    tally.latencies.append(time.monotonic() - start)
                    tally.ttfts.append(ttft or 0.0)
                elif last != "error":
                    tally.error(f"stream on {path} ended without [DONE] after {events} events")
        except httpx.HTTPError as exc:
            tally.error(f"{type(exc).__name__} on {path}: {exc}")


async def run_load(url: str, model: str, targets: list[Target], args) -> tuple[Tally, list[Sample]]:
    tally = Tally()
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8)
    timeout = httpx.Timeout(args.request_timeout_s, connect=10)
    t0 = time.monotonic()
    stop_at = t0 + args.duration
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=_headers(args.api_key)) as c:
        tasks = [asyncio.create_task(client_loop(i, c, url, model, args, stop_at, tally))
                 for i in range(args.concurrency)]
        while time.monotonic() < stop_at:
            samples.append(await asyncio.to_thread(probe, targets, time.monotonic() - t0, args.api_key))
            if not args.quiet:
                s = samples[-1]
                print(f"  t={s.t:6.1f}s ok={tally.ok} 429={tally.rejected_429} errors={tally.errors} "
                      f"rss={sum(s.rss_mb.values()):.0f}MB kv={max(s.kv_usage.values(), default=0):.2f} "
                      f"running={sum(s.running.values()):.0f}", file=sys.stderr, flush=True)
            await asyncio.sleep(args.sample_interval_s)
        done, pending = await asyncio.wait(tasks, timeout=args.request_timeout_s + 5)
        for task in pending:  # a request that never ended: an error (a hang), not a leak to ignore
            task.cancel()
            tally.error("a client's request did not finish within --request-timeout-s after the run")
        await asyncio.gather(*tasks, return_exceptions=True)
    return tally, samples


# ---- verdict ---------------------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def rss_growth(samples: list[Sample], warmup_s: float) -> dict[str, dict[str, float]]:
    """Per process: mean RSS over the first fifth of the post-warm-up samples vs. the last fifth."""
    out = {}
    names = sorted({n for s in samples for n in s.rss_mb})
    for name in names:
        series = [s.rss_mb[name] for s in samples if s.t >= warmup_s and name in s.rss_mb]
        if len(series) < 5:
            continue
        k = max(1, len(series) // 5)
        first, last = statistics.mean(series[:k]), statistics.mean(series[-k:])
        out[name] = {"first_mb": first, "last_mb": last, "max_mb": max(series), "growth": last / first - 1}
    return out


def settle(targets: list[Target], baseline: Sample, args) -> tuple[Sample, bool, bool]:
    """Wait (up to --settle-s) for KV usage and running/waiting to reach 0 and fds to return to baseline."""
    deadline = time.monotonic() + args.settle_s
    while True:
        s = probe(targets, -1, args.api_key)
        kv_ok = all(s.kv_usage.get(t.name, 0) == 0 and s.running.get(t.name, 0) == 0
                    and s.waiting.get(t.name, 0) == 0 for t in targets)
        fds_ok = all(s.fds.get(t.name, 0) <= baseline.fds.get(t.name, 0) + args.fd_slack
                     for t in targets if t.name in baseline.fds)
        if (kv_ok and fds_ok) or time.monotonic() > deadline:
            return s, kv_ok, fds_ok
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--url", required=True, help="a worker (fleetserve serve) or, with --deployment, the platform")
    ap.add_argument("--deployment", help="send through the platform's gateway to this deployment")
    ap.add_argument("--api-key", help="bearer key (the worker's, or the platform's admin key)")
    ap.add_argument("--pid", type=int, action="append", default=[], help="worker process(es) to sample")
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (600 for the record)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds before RSS counts (default: 1/6 of it)")
    ap.add_argument("--max-tokens", type=int, default=32, help="largest max_tokens of a request")
    ap.add_argument("--cancel-fraction", type=float, default=0.05, help="requests hung up on mid-stream on purpose")
    ap.add_argument("--sample-interval-s", type=float, default=2.0)
    ap.add_argument("--request-timeout-s", type=float, default=120.0)
    ap.add_argument("--settle-s", type=float, default=30.0)
    ap.add_argument("--max-rss-growth", type=float, default=0.10)
    ap.add_argument("--fd-slack", type=int, default=2, help="open fds allowed above the pre-run baseline")
    ap.add_argument("--max-p99-s", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_path", help="write the results here")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    url = args.url.rstrip("/")
    warmup = args.duration / 6 if args.warmup is None else args.warmup
    console = Console()
    try:
        targets, model = discover(url, args.deployment, args.api_key, args.pid)
    except (httpx.HTTPError, RuntimeError, KeyError, IndexError) as exc:
        console.print(f"[bold red]cannot reach the target:[/] {exc}")
        return 2
    baseline = probe(targets, 0.0, args.api_key)
    load = {"cpu_count": psutil.cpu_count(), "loadavg_before": list(psutil.getloadavg())}
    console.print(f"soak: {args.concurrency} streams for {args.duration:.0f}s against {url} (model {model}); "
                  f"watching {', '.join(f'{t.name} (pid {t.pid})' for t in targets)}")
    started = time.time()
    tally, samples = asyncio.run(run_load(url, model, targets, args))
    load["loadavg_after"] = list(psutil.getloadavg())
    after, kv_ok, fds_ok = settle(targets, baseline, args)
    growth = rss_growth(samples, warmup)
    p50, p99 = _pct(tally.latencies, 50), _pct(tally.latencies, 99)
    criteria = {
        "errors (other than 429) = 0": tally.errors == 0,
        f"RSS growth after warm-up < {args.max_rss_growth:.0%}": bool(growth)
                                                                  and all(g["growth"] < args.max_rss_growth for g in growth.values()),
        "KV cache usage, running, waiting back to 0": kv_ok,
        f"open fds back to baseline (+{args.fd_slack})": fds_ok,
        "requests completed": tally.ok > 0,
    }
    if args.max_p99_s is not None:
        criteria[f"p99 latency <= {args.max_p99_s}s"] = p99 is not None and p99 <= args.max_p99_s
    if not any(t.pid for t in targets):
        criteria.pop(f"RSS growth after warm-up < {args.max_rss_growth:.0%}")
        criteria.pop(f"open fds back to baseline (+{args.fd_slack})")

    table = Table(title=f"soak: {args.duration:.0f}s, {args.concurrency} concurrent streams")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [("requests ok", tally.ok), ("rejected 429", tally.rejected_429), ("hung up on purpose", tally.cancelled),
            ("errors", tally.errors), ("output tokens", tally.tokens),
            ("requests/s", f"{tally.ok / args.duration:.1f}"), ("tokens/s", f"{tally.tokens / args.duration:.1f}"),
            ("latency p50 / p99 (s)", f"{p50 or 0:.3f} / {p99 or 0:.3f}"),
            ("TTFT p50 / p99 (s)", f"{_pct(tally.ttfts, 50) or 0:.3f} / {_pct(tally.ttfts, 99) or 0:.3f}")]
    for name, g in growth.items():
        rows.append((f"RSS {name}: first / last / max (MB)",
                     f"{g['first_mb']:.0f} / {g['last_mb']:.0f} / {g['max_mb']:.0f} ({g['growth']:+.1%})"))
    for t in targets:
        rows.append((f"fds {t.name}: before / after", f"{baseline.fds.get(t.name, '-')} / {after.fds.get(t.name, '-')}"))
        rows.append((f"KV usage {t.name}: max during / after",
                     f"{max((s.kv_usage.get(t.name, 0) for s in samples), default=0):.2f} / "
                     f"{after.kv_usage.get(t.name, 0):.2f}"))
    rows.append(("load average before / after", f"{load['loadavg_before'][0]:.2f} / {load['loadavg_after'][0]:.2f}"
                                                f" ({load['cpu_count']} cores)"))
    for k, v in rows:
        table.add_row(k, str(v))
    for name, ok in criteria.items():
        table.add_row(f"[bold]{name}[/]", "[green]pass[/]" if ok else "[red]FAIL[/]")
    console.print(table)
    for example in tally.error_examples:
        console.print(f"  [red]error:[/] {example}", markup=True, highlight=False)

    passed = all(criteria.values())
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"url": url, "deployment": args.deployment, "model": model, "started_at": started,
                       "args": vars(args), "targets": [asdict(t) for t in targets], "load": load,
                       "ok": tally.ok, "rejected_429": tally.rejected_429, "cancelled": tally.cancelled,
                       "errors": tally.errors, "error_examples": tally.error_examples, "output_tokens": tally.tokens,
                       "latency_s": {"p50": p50, "p95": _pct(tally.latencies, 95), "p99": p99},
                       "ttft_s": {"p50": _pct(tally.ttfts, 50), "p99": _pct(tally.ttfts, 99)},
                       "rss_growth": growth, "fds_before": baseline.fds, "fds_after": after.fds,
                       "kv_usage_after": after.kv_usage, "samples": [asdict(s) for s in samples],
                       "criteria": criteria, "passed": passed}, f, indent=2)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
