"""Pure functions from request records to a summary. No I/O, no clocks: everything is computed from
the timestamps in the records, so the arithmetic can be tested exactly.

Definitions (all latencies in milliseconds in the summary):

* TTFT: first output chunk's arrival - request start (the request is started when it is sent, after any
  wait for a ``--concurrency`` slot).
* E2E: end of the stream - request start.
* TPOT, per request with at least 2 output tokens: (E2E - TTFT) / (output tokens - 1).
* ITL: every gap between consecutive output chunks of a request, all requests pooled.
* Percentiles: numpy's default "linear" method: sort the n values, take the (q / 100) * (n - 1)-th,
  interpolating linearly between the two nearest ranks. The median is the 50th percentile.
* Throughputs: completed requests' totals / duration; duration is the time from the first request being
  dispatched to the last one finishing (the caller passes it; by default the records' span).
* Goodput: completed requests meeting every given SLO / duration. A request with one output token has no
  TPOT and meets any TPOT SLO.

Failed requests count only in ``failed`` and ``errors`` (by type); every other figure is over completed
requests.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STAT_KEYS = ("mean", "median", "p90", "p95", "p99", "max")
DISTRIBUTIONS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")


@dataclass
class RequestRecord:
    """What one request did; times are seconds on one monotonic clock (``time.perf_counter``)."""

    index: int
    start: float
    end: float
    prompt_len: int = 0  # input tokens: usage.prompt_tokens when reported, else the tokenizer's count
    output_len: int = 0  # requested max_tokens
    output_tokens: int = 0  # usage.completion_tokens when reported, else the tokenizer's count of the text
    chunk_times: list[float] = field(default_factory=list)  # arrival of every chunk that carried output
    success: bool = True
    error_type: str | None = None  # http_<status> | timeout | connection_error | stream_error | ...
    error: str | None = None
    usage_reported: bool = False
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens when reported

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        ttft = self.ttft
        if ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in itertools.pairwise(t)]


@dataclass(frozen=True)
class SLO:
    """Service-level objectives in milliseconds; None = no objective on that metric."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> SLO | None:
        """``ttft_ms=500,tpot_ms=50,e2e_ms=10000`` (any subset)."""
        if not text or not text.strip():
            return None
        values: dict[str, float] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in SLO_KEYS:
                raise ValueError(f"--slo takes KEY=MS pairs separated by commas with KEY one of "
                                 f"{', '.join(SLO_KEYS)} (e.g. ttft_ms=500,tpot_ms=50), got {part.strip()!r}")
            try:
                values[key] = float(value)
            except ValueError:
                raise ValueError(f"--slo {key} must be a number of milliseconds, got {value.strip()!r}") from None
            if values[key] <= 0:
                raise ValueError(f"--slo {key} must be positive, got {value.strip()}")
        return cls(**values)

    def met(self, r: RequestRecord) -> bool:
        if not r.success:
            return False
        ttft, tpot = r.ttft, r.tpot
        if self.ttft_ms is not None and (ttft is None or ttft * 1000 > self.ttft_ms):
            return False
        if self.tpot_ms is not None and tpot is not None and tpot * 1000 > self.tpot_ms:
            return False
        return self.e2e_ms is None or r.e2e * 1000 <= self.e2e_ms

    def as_dict(self) -> dict[str, float]:
        return {k: v for k in SLO_KEYS if (v := getattr(self, k)) is not None}


def percentile(values: list[float], q: float) -> float:
    """numpy's linear-interpolation percentile (q in 0..100)."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q, method="linear"))


def distribution(values: list[float]) -> dict[str, float | int | None]:
    """count, mean, median, p90, p95, p99, max of ``values`` (all None but count when empty)."""
    if not values:
        return {"count": 0, **dict.fromkeys(STAT_KEYS)}
    arr = np.asarray(values, dtype=np.float64)
    return {"count": len(values), "mean": float(arr.mean()), "median": percentile(values, 50),
            "p90": percentile(values, 90), "p95": percentile(values, 95), "p99": percentile(values, 99),
            "max": float(arr.max())}


def records_span(records: list[RequestRecord]) -> float:
    """First start to last end, in seconds (0 when empty)."""
    if not records:
        return 0.0
    return max(r.end for r in records) - min(r.start for r in records)


def summarize(records: list[RequestRecord], duration: float | None = None, slo: SLO | None = None) -> dict[str, Any]:
    """The summary of one run (one endpoint at one level); see the module docstring for definitions."""
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    if duration is None:
        duration = records_span(records)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: None)
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    ms = 1000.0
    ttfts = [t * ms for r in ok if (t := r.ttft) is not None]
    tpots = [t * ms for r in ok if (t := r.tpot) is not None]
    itls = [g * ms for r in ok for g in r.itls]
    e2es = [r.e2e * ms for r in ok]
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    summary: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(failed),
        "errors": dict(sorted(Counter(r.error_type or "unknown" for r in failed).items())),
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": per_s(len(ok)),
        "input_throughput": per_s(input_tokens),
        "output_throughput": per_s(output_tokens),
        "total_token_throughput": per_s(input_tokens + output_tokens),
        "ttft_ms": distribution(ttfts),
        "tpot_ms": distribution(tpots),
        "itl_ms": distribution(itls),
        "e2e_ms": distribution(e2es),
        "slo": slo.as_dict() if slo else None,
        "good_requests": None,
        "goodput": None,
        "usage_reported": sum(r.usage_reported for r in ok),
        "cached_tokens": sum(cached) if cached else None,
    }
    if slo is not None:
        good = sum(slo.met(r) for r in ok)
        summary["good_requests"] = good
        summary["goodput"] = per_s(good)
    return summary


def flatten(summary: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves as dotted keys (``ttft_ms.p99``), for ratios and tables."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            if key in ("slo",):
                continue
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    """B / A for every numeric figure both summaries have (None where A is 0 or missing)."""
    fa, fb = flatten(a), flatten(b)
    return {k: (fb[k] / v if v else None) for k, v in fa.items() if k in fb}


def output_timeline(records: list[RequestRecord], t0: float, bin_s: float = 1.0) -> tuple[list[float], list[float]]:
    """Output tokens per second in ``bin_s`` bins from ``t0``: (bin starts, tokens/s).

    A request's output tokens are spread evenly over its output chunks (servers may pack several tokens
    in one chunk and report only the total).
    """
    times: list[float] = []
    weights: list[float] = []
    for r in records:
        if r.success and r.chunk_times and r.output_tokens:
            w = r.output_tokens / len(r.chunk_times)
            times += [t - t0 for t in r.chunk_times]
            weights += [w] * len(r.chunk_times)
    if not times:
        return [], []
    nbins = int(max(times) // bin_s) + 1
    hist, _ = np.histogram(times, bins=nbins, range=(0, nbins * bin_s), weights=weights)
    return [i * bin_s for i in range(nbins)], [float(h) / bin_s for h in hist]
