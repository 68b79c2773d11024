"""Autoscaling: a pure policy (signals in, desired replica count and the reason out) and the loop that
feeds it from the gateway's and replicas' live numbers.

Target tracking: desired = ceil(load / target_concurrency), raised further when the per-replica
queue or the p95 TTFT is over its target. Scale-ups are bounded (at most doubling, at least +1) and
wait `scale_up_cooldown_s`; scale-downs need the lower count to stay comfortably under target
(hysteresis) for `scale_down_cooldown_s` and go one replica at a time. With `replicas.min = 0`, no
request for `scale_to_zero_after_s` scales to zero; a request arriving then scales to one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

SCALE_DOWN_HEADROOM = 0.7  # scale down only if the smaller fleet would run at <= 70% of target
SCALE_UP_TOLERANCE = 0.1  # and up only when load exceeds the current fleet's target by 10% (as HPA does)


class AutoscalePolicy(BaseModel):
    # no NaN/Infinity: JSON cannot store them, so a spec holding one could not be read back from the store
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    target_concurrency: float = Field(4.0, gt=0, description="in-flight requests per replica to aim for")
    target_queue_depth: float = Field(4.0, gt=0, description="waiting requests per replica before adding one")
    max_ttft_p95_ms: float | None = Field(None, gt=0, description="add a replica while p95 TTFT is above this")
    scale_up_cooldown_s: float = Field(10.0, ge=0)
    scale_down_cooldown_s: float = Field(60.0, ge=0)
    scale_to_zero_after_s: float = Field(300.0, gt=0, description="idle time before scaling to zero (min = 0)")
    window_s: float = Field(30.0, gt=0, description="averaging window for load signals")


@dataclass
class Signals:
    """Averages over the policy's window, for one deployment."""

    concurrency: float  # requests in flight (gateway) incl. held ones
    queue_depth: float  # waiting in replicas' engines, summed
    ttft_p95_ms: float | None
    idle_s: float  # since the last request
    pending: int = 0  # requests held by the gateway right now (cold start)


@dataclass
class Decision:
    desired: int
    reason: str


def decide(policy: AutoscalePolicy, lo: int, hi: int, current: int, s: Signals, now: float,
           last_up: float, last_down: float, low_since: float | None) -> tuple[Decision, float | None]:
    """Returns the decision and the updated `low_since` (when the load first allowed a scale-down)."""
    if current == 0:
        if s.pending or s.concurrency > 0 or lo > 0:
            return Decision(max(1, lo), f"scaled 0 -> {max(1, lo)}: {max(s.pending, 1)} request(s) waiting "
                                        f"(cold start)" if lo == 0 else f"minimum is {lo}"), None
        return Decision(0, "idle"), None
    if current > hi:
        return Decision(hi, f"scaled {current} -> {hi}: maximum is {hi}"), None
    if current < max(lo, 1):
        return Decision(max(lo, 1), f"scaled {current} -> {max(lo, 1)}: minimum is {max(lo, 1)}"), None
    if lo == 0 and s.idle_s >= policy.scale_to_zero_after_s and s.concurrency == 0 and s.pending == 0:
        return Decision(0, f"scaled {current} -> 0: no request for {s.idle_s:.0f}s "
                           f">= scale_to_zero_after_s {policy.scale_to_zero_after_s:.0f}s"), None
    floor = max(lo, 1)
    want = math.ceil(s.concurrency / policy.target_concurrency) if s.concurrency > 0 else 0
    if want > current and s.concurrency <= policy.target_concurrency * current * (1 + SCALE_UP_TOLERANCE):
        want = current  # within tolerance of the target: noise, not load
    why = f"{s.concurrency:.1f} concurrent requests > target {policy.target_concurrency:g} x {current}"
    if s.queue_depth / current > policy.target_queue_depth:
        want = max(want, current + 1)
        why = (f"queue depth {s.queue_depth:.1f} > target {policy.target_queue_depth:g} x {current}")
    if policy.max_ttft_p95_ms is not None and s.ttft_p95_ms is not None and s.ttft_p95_ms > policy.max_ttft_p95_ms:
        want = max(want, current + 1)
        why = f"p95 TTFT {s.ttft_p95_ms:.0f} ms > {policy.max_ttft_p95_ms:.0f} ms"
    want = min(max(want, floor), hi)
    if want > current:
        if now - last_up < policy.scale_up_cooldown_s:
            return Decision(current, "scale-up cooling down"), None
        step = min(want, current * 2, hi)
        return Decision(step, f"scaled {current} -> {step}: {why}"), None
    # scale down one at a time, with headroom, after the load stayed low for the cooldown
    smaller = current - 1
    if smaller >= floor and s.concurrency <= SCALE_DOWN_HEADROOM * policy.target_concurrency * smaller \
            and s.queue_depth == 0:
        low_since = now if low_since is None else low_since
        if now - low_since >= policy.scale_down_cooldown_s and now - last_down >= policy.scale_down_cooldown_s:
            return Decision(smaller, f"scaled {current} -> {smaller}: {s.concurrency:.1f} concurrent requests "
                                     f"<= {SCALE_DOWN_HEADROOM:g} x target {policy.target_concurrency:g} "
                                     f"x {smaller} for {now - low_since:.0f}s"), None
        return Decision(current, "load low, waiting out the scale-down cooldown"), low_since
    return Decision(current, "within target"), None


@dataclass
class _State:
    last_up: float = 0.0
    last_down: float = 0.0
    low_since: float | None = None
    samples: list[tuple[float, float]] | None = None  # (ts, concurrency)


class Autoscaler:
    """Feeds `decide` once a second per deployment and applies the result to the reconciler."""

    def __init__(self, store, reconciler, gateway, metrics):
        self.store, self.reconciler, self.gateway, self.metrics = store, reconciler, gateway, metrics
        self.state: dict[str, _State] = {}

    def signals(self, name: str, policy: AutoscalePolicy, now: float, created_at: float) -> Signals:
        st = self.state.setdefault(name, _State(samples=[]))
        traffic = self.gateway.traffic.get(name)
        pending = self.gateway.pending.get(name, 0)
        conc = (traffic.in_flight if traffic else 0) + pending
        st.samples.append((now, conc))
        st.samples = [(t, c) for t, c in st.samples if now - t <= policy.window_s]
        avg = sum(c for _, c in st.samples) / len(st.samples)
        series = self.metrics.series.get(name)
        point = series[-1] if series else {}
        last_request = traffic.last_request if traffic and traffic.last_request else created_at
        return Signals(concurrency=max(avg, conc if pending else 0.0), queue_depth=point.get("queue_depth") or 0.0,
                       ttft_p95_ms=point.get("ttft_p95_ms"), idle_s=now - last_request, pending=pending)

    def step(self, now: float) -> None:
        for d in self.store.list():
            if d.deleting:
                continue
            lo, hi = d.spec.replicas.min, d.spec.replicas.max
            if d.name not in self.reconciler.desired_override:  # first sight (or restart): keep what runs
                live = len([r for r in self.store.replicas(d.name) if r.status != "draining"])
                self.reconciler.desired_override[d.name] = min(max(live, lo), hi)
            current = self.reconciler.desired_override[d.name]
            policy = d.spec.autoscale
            s = self.signals(d.name, policy, now, d.created_at)
            st = self.state[d.name]
            decision, st.low_since = decide(policy, lo, hi, current, s, now, st.last_up, st.last_down, st.low_since)
            if decision.desired != current:
                if decision.desired > current:
                    st.last_up = now
                else:
                    st.last_down = now
                self.reconciler.desired_override[d.name] = decision.desired
                self.store.event(d.name, "Autoscaled", decision.reason)
                self.reconciler.poke()
        for name in set(self.state) - {d.name for d in self.store.list()}:
            self.state.pop(name, None)
            self.reconciler.desired_override.pop(name, None)
