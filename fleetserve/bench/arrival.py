"""When each request is sent: arrival offsets and the load levels of a sweep.

Arrivals follow sglang.bench_serving / ``vllm bench serve``: the gaps between requests are drawn from a
gamma distribution with shape ``burstiness`` and mean ``1 / request_rate`` (shape 1 = a Poisson process;
below 1 burstier, above 1 more regular). The first request goes at offset 0; ``request_rate`` inf sends
every request at once (then only ``--concurrency`` limits them). Offsets are drawn from a generator
seeded with ``--seed``, so the same seed gives the same arrival times.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Level:
    """One load level: a concurrency cap (None: unlimited) and a request rate (inf: all at once)."""

    concurrency: int | None = None
    request_rate: float = math.inf

    def label(self) -> str:
        parts = []
        if self.concurrency is not None:
            parts.append(f"concurrency {self.concurrency}")
        if math.isfinite(self.request_rate):
            parts.append(f"{self.request_rate:g} req/s")
        return ", ".join(parts) or "all at once"

    def short(self) -> str:
        """``c=4``, ``r=2``, ``c=4 r=2`` or ``all`` (for narrow table columns)."""
        parts = []
        if self.concurrency is not None:
            parts.append(f"c={self.concurrency}")
        if math.isfinite(self.request_rate):
            parts.append(f"r={self.request_rate:g}")
        return " ".join(parts) or "all"

    def as_dict(self) -> dict:
        return {"concurrency": self.concurrency,
                "request_rate": self.request_rate if math.isfinite(self.request_rate) else "inf"}


def arrival_offsets(request_rate: float, burstiness: float = 1.0, seed: int = 0) -> Iterator[float]:
    """Seconds from the start at which request 0, 1, 2, ... arrives (an endless iterator)."""
    if not request_rate > 0:
        raise ValueError(f"request rate must be positive (or inf), got {request_rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    if math.isinf(request_rate):
        while True:
            yield 0.0
    rng = np.random.default_rng([seed, 7])
    scale = 1.0 / (request_rate * burstiness)  # gamma mean = shape * scale = 1 / rate
    t = 0.0
    while True:
        yield t
        t += float(rng.gamma(shape=burstiness, scale=scale))


def parse_levels(concurrency: str | None, request_rate: str | None) -> list[Level]:
    """``--concurrency 1,4,16`` and/or ``--request-rate 1,2,inf``: one level per value (the product of both)."""
    caps: list[int | None] = [None]
    rates: list[float] = [math.inf]
    if concurrency is not None and concurrency.strip():
        caps = []
        for part in concurrency.split(","):
            part = part.strip()
            if part.lower() in ("inf", "none", "unlimited", "0"):
                caps.append(None)
                continue
            try:
                value = int(part)
            except ValueError:
                raise ValueError(f"--concurrency takes positive integers separated by commas (e.g. 1,4,16), "
                                 f"got {part!r}") from None
            if value < 1:
                raise ValueError(f"--concurrency values must be at least 1 (0 or inf: unlimited), got {value}")
            caps.append(value)
    if request_rate is not None and request_rate.strip():
        rates = []
        for part in request_rate.split(","):
            part = part.strip()
            try:
                value = float(part)
            except ValueError:
                raise ValueError(f"--request-rate takes requests per second separated by commas (e.g. 1,2,inf), "
                                 f"got {part!r}") from None
            if not value > 0:
                raise ValueError(f"--request-rate values must be positive (inf: all at once), got {part}")
            rates.append(value)
    return [Level(c, r) for c in caps for r in rates]
