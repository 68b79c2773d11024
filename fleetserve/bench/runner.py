"""Orchestration: warm-up, load levels (sweeps), and A/B comparison in alternating rounds.

One *block* sends a contiguous range of workload requests to one endpoint: each request is dispatched
at its arrival offset (relative to the block's first request), waits for a ``--concurrency`` slot, and
is timed from the moment it is sent. A block ends when its last request finishes; its duration is from
its start to that moment.

* Single endpoint: one block per level holds all ``--num-prompts`` requests (or runs ``--duration``
  seconds, then lets the requests in flight finish).
* ``--compare``: each level is split into ``--rounds`` rounds. In every round both endpoints get the
  *same* requests with the same arrival offsets, one after the other, and the order alternates
  (A B, B A, A B, ...), so slow drifts of the machine (thermal, other tenants, caches) hit both alike and
  the two servers never compete for the machine. An endpoint's duration is the sum of its blocks, so its
  throughput is over the time it was actually under load.
* Sweeps: every level (each ``--concurrency`` x ``--request-rate`` value) draws fresh generated prompts
  (workload stream ``level + 1``; stream 0 is the warm-up).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from fleetserve.bench.arrival import Level, arrival_offsets
from fleetserve.bench.client import BenchSetupError, HTTPClient, Target, base_url, discover_model
from fleetserve.bench.datasets import BenchRequest, Workload, build_workload, load_tokenizer
from fleetserve.bench.metrics import SLO, RequestRecord, ratios, summarize
from fleetserve.bench.offline import EngineClient, OfflineSettings, load_offline_engine


@dataclass
class BenchConfig:
    """Everything one `fleetserve bench` run needs (the CLI flags, validated)."""

    url: str | None = None
    model: str | None = None
    api_key: str | None = None
    endpoint: str = "completions"
    tokenizer: str = "default"
    dataset: str = "random"
    dataset_path: str | None = None
    input_len: int = 1024
    output_len: int | None = None
    range_ratio: float = 0.0
    num_groups: int = 4
    prefix_len: int = 512
    suffix_len: int = 32
    levels: list[Level] = field(default_factory=lambda: [Level()])
    burstiness: float = 1.0
    num_prompts: int = 100
    duration: float | None = None
    warmup: int = 1
    seed: int = 0
    slo: SLO | None = None
    timeout: float = 600.0
    ignore_eos: bool = False
    temperature: float | None = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    compare: str | None = None
    model2: str | None = None
    api_key2: str | None = None
    rounds: int = 4
    offline: bool = False
    offline_settings: OfflineSettings | None = None
    progress: bool = True

    def check(self) -> None:
        """Raises ValueError naming the flag for combinations that cannot run."""
        if self.offline and self.compare:
            raise ValueError("--offline and --compare cannot be combined; compare two URLs, or run --offline alone")
        if not self.offline and not self.url:
            raise ValueError("--url is required (the server to benchmark), unless --offline runs the engine in-process")
        if self.dataset in ("sharegpt", "prompts"):
            if not self.dataset_path:
                raise ValueError(f"--dataset {self.dataset} needs --dataset-path FILE")
            if not Path(self.dataset_path).is_file():
                raise ValueError(f"--dataset-path {self.dataset_path} is not a file")
        if self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be at least 1, got {self.num_prompts}")
        if self.duration is not None and self.duration <= 0:
            raise ValueError(f"--duration must be positive seconds, got {self.duration}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be 0 or more, got {self.warmup}")
        if self.rounds < 1:
            raise ValueError(f"--rounds must be at least 1, got {self.rounds}")
        if self.timeout <= 0:
            raise ValueError(f"--timeout must be positive seconds, got {self.timeout}")
        if not self.burstiness > 0:
            raise ValueError(f"--burstiness must be positive, got {self.burstiness}")
        if self.duration is not None:
            for level in self.levels:
                if level.concurrency is None and math.isinf(level.request_rate):
                    raise ValueError("--duration needs --concurrency N or a finite --request-rate R: with neither, "
                                     "requests would be sent without limit")


@dataclass
class EndpointRun:
    """One endpoint at one level: its records and the blocks (start, end) it ran in."""

    records: list[RequestRecord]
    blocks: list[tuple[float, float]]

    @property
    def duration(self) -> float:
        return sum(end - start for start, end in self.blocks)


@dataclass
class LevelResult:
    level: Level
    t0: float  # perf_counter at the level's first dispatch (plots count time from here)
    runs: dict[str, EndpointRun]
    summaries: dict[str, dict[str, Any]]
    ratios: dict[str, float | None] | None = None  # B / A when comparing


@dataclass
class BenchResult:
    config: BenchConfig
    targets: list[dict[str, Any]]
    workload: dict[str, Any]
    levels: list[LevelResult]
    started_at: str
    mode: str  # "online" | "offline"
    engine: dict[str, Any] | None = None  # offline: what was loaded
    warnings: list[str] = field(default_factory=list)


class _Offsets:
    """Arrival offsets by request index, drawn lazily (a --duration run does not know how many it needs)."""

    def __init__(self, rate: float, burstiness: float, seed: int):
        self._it = arrival_offsets(rate, burstiness, seed)
        self._values: list[float] = []

    def __getitem__(self, i: int) -> float:
        while len(self._values) <= i:
            self._values.append(next(self._it))
        return self._values[i]


class _Requests:
    """Workload requests by index, built once and shared by both endpoints of a comparison."""

    def __init__(self, workload: Workload, stream: int):
        self.workload, self.stream = workload, stream
        self._cache: dict[int, BenchRequest] = {}

    def __getitem__(self, i: int) -> BenchRequest:
        if i not in self._cache:
            self._cache[i] = self.workload.request(i, self.stream)
        return self._cache[i]


async def _one(client, req: BenchRequest, sem: asyncio.Semaphore | None, on_done) -> RequestRecord:
    try:
        rec = await client.send(req)
    finally:
        if sem is not None:
            sem.release()
    if on_done is not None:
        on_done(rec)
    return rec


async def run_block(client, requests: _Requests, offsets: _Offsets, start: int, stop: int | None,
                    concurrency: int | None, deadline_s: float | None = None,
                    on_done: Callable[[RequestRecord], None] | None = None) -> tuple[list[RequestRecord], float, float, int]:
    """Requests ``start`` .. ``stop - 1`` (or until ``deadline_s`` from the block start) to one endpoint.

    Returns (records, block start, block end, the next index not sent).
    """
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    tasks: list[asyncio.Task] = []
    base = offsets[start]
    t0 = time.perf_counter()
    i = start
    while stop is None or i < stop:
        due = t0 + offsets[i] - base
        if deadline_s is not None and due >= t0 + deadline_s:
            break
        req = requests[i]
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if sem is not None:
            await sem.acquire()
            if deadline_s is not None and time.perf_counter() >= t0 + deadline_s:
                sem.release()
                break
        tasks.append(asyncio.create_task(_one(client, req, sem, on_done)))
        i += 1
    records = list(await asyncio.gather(*tasks))
    end = max((r.end for r in records), default=time.perf_counter())
    return records, t0, end, i


def _chunks(n: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, n))
    size, extra = divmod(n, parts)
    out, s = [], 0
    for k in range(parts):
        e = s + size + (1 if k < extra else 0)
        out.append((s, e))
        s = e
    return out


class _Progress:
    """A live rich progress bar per level (or nothing when disabled)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._progress = None

    def __enter__(self) -> Self:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                      console=Console(stderr=True), transient=False)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def task(self, description: str, total: int | None) -> Callable[[RequestRecord], None]:
        if self._progress is None:
            return lambda rec: None
        progress = self._progress
        task_id = progress.add_task(description, total=total, status="")
        counts = {"ok": 0, "failed": 0}

        def done(rec: RequestRecord) -> None:
            counts["ok" if rec.success else "failed"] += 1
            status = f"[green]{counts['ok']} ok[/]" + (f" [red]{counts['failed']} failed[/]" if counts["failed"] else "")
            progress.update(task_id, advance=1, status=status)

        return done


class Runner:
    """Runs a benchmark for one config against prepared clients (label -> client)."""

    def __init__(self, config: BenchConfig, workload: Workload, clients: dict[str, Any]):
        self.config, self.workload, self.clients = config, workload, clients

    async def warmup(self) -> None:
        cfg = self.config
        if cfg.warmup <= 0:
            return
        requests = _Requests(self.workload, 0)
        offsets = _Offsets(math.inf, 1.0, cfg.seed)
        cap = cfg.levels[0].concurrency
        for label, client in self.clients.items():
            records, *_ = await run_block(client, requests, offsets, 0, cfg.warmup, min(cfg.warmup, cap or cfg.warmup))
            if not any(r.success for r in records):
                first = records[0]
                raise BenchSetupError(f"every warm-up request to endpoint {label} failed; the first with "
                                      f"{first.error_type}: {first.error}")

    async def level(self, k: int, level: Level, progress: _Progress) -> LevelResult:
        cfg = self.config
        requests = _Requests(self.workload, k + 1)
        offsets = _Offsets(level.request_rate, cfg.burstiness, cfg.seed)
        labels = list(self.clients)
        runs = {label: EndpointRun([], []) for label in labels}
        n = cfg.num_prompts
        total = None if cfg.duration is not None else n * len(labels)
        on_done = progress.task(f"{level.label()}" + (" (A/B)" if len(labels) > 1 else ""), total)
        # Build prompts before the clock starts (building one on the event loop would delay the chunk
        # timestamps of requests in flight). --duration: as many as the rate implies, at least --num-prompts.
        prebuild = n
        if cfg.duration is not None and math.isfinite(level.request_rate):
            prebuild = max(n, min(100_000, int(level.request_rate * cfg.duration * 1.2) + 8))
        for i in range(prebuild):
            requests[i]
        rounds = 1 if len(labels) == 1 else cfg.rounds
        chunks = _chunks(n, rounds) if cfg.duration is None else [None] * rounds
        next_start = 0
        for r, chunk in enumerate(chunks):
            order = labels if r % 2 == 0 else labels[::-1]
            reached = next_start
            for label in order:
                if chunk is not None:
                    recs, t0, t1, _ = await run_block(self.clients[label], requests, offsets, chunk[0], chunk[1],
                                                      level.concurrency, on_done=on_done)
                else:
                    recs, t0, t1, stop = await run_block(self.clients[label], requests, offsets, next_start, None,
                                                         level.concurrency, cfg.duration / rounds, on_done=on_done)
                    reached = max(reached, stop)
                runs[label].records.extend(recs)
                runs[label].blocks.append((t0, t1))
            next_start = reached
        t0 = min(start for run in runs.values() for start, _ in run.blocks)
        summaries = {label: summarize(run.records, run.duration, cfg.slo) for label, run in runs.items()}
        result = LevelResult(level, t0, runs, summaries)
        if len(labels) == 2:
            result.ratios = ratios(summaries[labels[0]], summaries[labels[1]])
        return result

    async def run(self) -> list[LevelResult]:
        await self.warmup()
        results = []
        with _Progress(self.config.progress) as progress:
            for k, level in enumerate(self.config.levels):
                results.append(await self.level(k, level, progress))
        return results


def _load_tokenizer(spec: str):
    from fleetserve.models import ModelResolutionError, resolve_model

    try:
        return load_tokenizer(resolve_model(spec, progress=True))
    except (ModelResolutionError, ValueError) as exc:
        raise BenchSetupError(f"cannot load the tokenizer {spec!r}: {exc}. Pass --tokenizer with the served "
                              "model's spec ('default', a local path or a Hub id)") from None


async def _run_online(cfg: BenchConfig, tokenizer) -> BenchResult:
    targets = [Target("A", base_url(cfg.url), cfg.model, cfg.api_key)]
    if cfg.compare:
        # B's model is discovered unless --model2 names it; A's key is never sent to B.
        targets.append(Target("B", base_url(cfg.compare), cfg.model2, cfg.api_key2))
    for t in targets:
        if t.model is None:
            t.model = await discover_model(t.url, t.api_key)
    if tokenizer is None:
        tokenizer = _load_tokenizer(cfg.tokenizer)
    workload = _workload(cfg, tokenizer)
    clients = {t.label: HTTPClient(t, cfg.endpoint, tokenizer, timeout=cfg.timeout, ignore_eos=cfg.ignore_eos,
                                   temperature=cfg.temperature, extra_body=cfg.extra_body) for t in targets}
    started = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        levels = await Runner(cfg, workload, clients).run()
    finally:
        for c in clients.values():
            await c.aclose()
    result = BenchResult(cfg, [t.describe() for t in targets], workload.describe(), levels, started, "online")
    for label, c in clients.items():
        if c.prompt_len_mismatches:
            result.warnings.append(
                f"endpoint {label} counted a different number of prompt tokens than the tokenizer "
                f"{cfg.tokenizer!r} for {c.prompt_len_mismatches} request(s): pass the served model as --tokenizer "
                "so prompt lengths (and token-id prompts) match")
    return result


async def _run_offline(cfg: BenchConfig, engine, tokenizer, info) -> BenchResult:
    workload = _workload(cfg, tokenizer)
    client = EngineClient(engine, tokenizer, cfg.endpoint, ignore_eos=cfg.ignore_eos, temperature=cfg.temperature)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    levels = await Runner(cfg, workload, {"A": client}).run()
    target = {"label": "A", "url": None, "model": info["model"]}
    return BenchResult(cfg, [target], workload.describe(), levels, started, "offline", engine=info)


def _workload(cfg: BenchConfig, tokenizer) -> Workload:
    return build_workload(cfg.dataset, tokenizer, seed=cfg.seed,
                          dataset_path=Path(cfg.dataset_path) if cfg.dataset_path else None,
                          input_len=cfg.input_len, output_len=cfg.output_len, range_ratio=cfg.range_ratio,
                          num_groups=cfg.num_groups, prefix_len=cfg.prefix_len, suffix_len=cfg.suffix_len)


def run(cfg: BenchConfig, tokenizer=None) -> BenchResult:
    """Runs the benchmark ``cfg`` describes (online: ``tokenizer`` reuses an already-loaded one)."""
    cfg.check()
    if not cfg.offline:
        return asyncio.run(_run_online(cfg, tokenizer))
    engine, tokenizer, info = load_offline_engine(cfg.offline_settings or OfflineSettings(), progress=cfg.progress)
    try:
        return asyncio.run(_run_offline(cfg, engine, tokenizer, info))
    finally:
        engine.stop()
