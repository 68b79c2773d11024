"""Per-deployment metrics: scraped from every ready replica's /metrics plus the gateway's counters,
kept as a short time series (the console's charts, `fleetserve status`, later the autoscaler)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

SERIES_LEN = 300  # points per deployment (10 minutes at the default 2 s interval)


@dataclass
class ReplicaSample:
    generation_tokens: float = 0.0
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    ttft_buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count


def parse_worker_metrics(text: str) -> ReplicaSample:
    s = ReplicaSample()
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            name, value = sample.name, sample.value
            if name == "fleetserve_generation_tokens_total":
                s.generation_tokens = value
            elif name == "fleetserve_num_requests_running":
                s.running = value
            elif name == "fleetserve_num_requests_waiting":
                s.waiting = value
            elif name == "fleetserve_kv_cache_usage":
                s.kv_usage = value
            elif name == "fleetserve_time_to_first_token_seconds_bucket":
                s.ttft_buckets[float(sample.labels["le"])] = value
    return s


def bucket_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus-style histogram_quantile over cumulative buckets (linear within a bucket)."""
    if not buckets:
        return None
    les = sorted(buckets)
    total = buckets[les[-1]]
    if total <= 0:
        return None
    rank, prev_le, prev_count = q * total, 0.0, 0.0
    for le in les:
        count = buckets[le]
        if count >= rank:
            if le == float("inf"):
                return prev_le
            width = count - prev_count
            return prev_le + (le - prev_le) * ((rank - prev_count) / width if width else 1.0)
        prev_le, prev_count = le, count
    return prev_le


class MetricsCollector:
    def __init__(self, interval_s: float = 2.0):
        self.interval_s = interval_s
        self.series: dict[str, deque] = {}
        self._last: dict[str, tuple[float, dict[str, ReplicaSample], int]] = {}  # name -> (ts, per replica, reqs)
        self._client = httpx.AsyncClient(timeout=2.0)

    async def close(self) -> None:
        await self._client.aclose()

    async def _scrape(self, url: str) -> ReplicaSample | None:
        try:
            resp = await self._client.get(f"{url}/metrics")
            return parse_worker_metrics(resp.text) if resp.status_code == 200 else None
        except httpx.HTTPError:
            return None

    async def sample(self, name: str, ready_urls: list[str], gateway_requests: int, ttfb: list[float]) -> dict:
        now = time.time()
        scraped = await asyncio.gather(*(self._scrape(u) for u in ready_urls))
        current = {u: s for u, s in zip(ready_urls, scraped) if s is not None}
        prev_ts, prev, prev_reqs = self._last.get(name, (now, {}, gateway_requests))
        dt = max(now - prev_ts, 1e-6)
        tokens = sum(max(0.0, s.generation_tokens - prev[u].generation_tokens) for u, s in current.items()
                     if u in prev)
        window: dict[float, float] = {}
        for u, s in current.items():
            before = prev.get(u)
            for le, c in s.ttft_buckets.items():
                window[le] = window.get(le, 0.0) + c - (before.ttft_buckets.get(le, 0.0) if before else 0.0)
        point = {
            "ts": now,
            "requests_per_s": round(max(0, gateway_requests - prev_reqs) / dt, 3) if prev else 0.0,
            "tokens_per_s": round(tokens / dt, 2) if prev else 0.0,
            "ttft_p50_ms": _ms(bucket_quantile(0.5, window)),
            "ttft_p95_ms": _ms(bucket_quantile(0.95, window)),
            "ttfb_p50_ms": _ms(_pct(ttfb, 0.5)),
            "running": sum(s.running for s in current.values()),
            "queue_depth": sum(s.waiting for s in current.values()),
            "kv_usage": round(sum(s.kv_usage for s in current.values()) / len(current), 4) if current else 0.0,
            "replicas": len(ready_urls),
        }
        self._last[name] = (now, current, gateway_requests)
        self.series.setdefault(name, deque(maxlen=SERIES_LEN)).append(point)
        return point

    def forget(self, name: str) -> None:
        self.series.pop(name, None)
        self._last.pop(name, None)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
