"""The autoscaling policy on synthetic load traces with a simulated clock (no processes)."""

from __future__ import annotations

import math
import random

from fleetserve.control.autoscaler import AutoscalePolicy, Signals, decide


def simulate(load, policy: AutoscalePolicy, lo: int, hi: int, seconds: int, start: int = 1,
             idle_after: float | None = None, queue=lambda t, n: 0.0):
    """Runs the policy once a second; returns [(t, desired, reason)] for every change."""
    current, last_up, last_down, low_since = start, -1e9, -1e9, None
    window = [load(-i) for i in range(int(policy.window_s), 0, -1)]  # the trace was already running
    changes = []
    last_request = 0.0
    for t in range(seconds):
        x = load(t)
        if x > 0:
            last_request = t
        window = (window + [x])[-int(policy.window_s):]
        s = Signals(concurrency=sum(window) / len(window), queue_depth=queue(t, current), ttft_p95_ms=None,
                    idle_s=t - last_request if idle_after is None else max(0, t - idle_after))
        d, low_since = decide(policy, lo, hi, current, s, t, last_up, last_down, low_since)
        assert lo <= d.desired <= hi or (lo == 0 and d.desired == 0)
        if d.desired != current:
            if d.desired > current:
                last_up = t
            else:
                last_down = t
            changes.append((t, d.desired, d.reason))
            current = d.desired
    return changes


def test_no_flapping_under_noisy_steady_load():
    rng = random.Random(1)
    policy = AutoscalePolicy(target_concurrency=4)
    changes = simulate(lambda t: max(0.0, rng.gauss(7.0, 2.0)), policy, 1, 8, 1800, start=2)
    # 7 concurrent at target 4 x 2 replicas: at most one adjustment in half an hour, never a reversal
    assert len(changes) <= 1, changes


def test_spike_is_followed_within_bounded_time_and_steps_are_bounded():
    policy = AutoscalePolicy(target_concurrency=2, scale_up_cooldown_s=10, window_s=10)
    changes = simulate(lambda t: 2.0 if t < 100 else 16.0, policy, 1, 8, 200)
    ups = [(t, n) for t, n, _ in changes]
    assert ups[-1][1] == 8  # 16 / 2 = 8 replicas
    assert ups[-1][0] - 100 <= 40  # 1 -> 2 -> 4 -> 8 with 10 s cooldowns (plus the window filling)
    previous = 1
    for _, n in ups:
        assert n <= previous * 2  # at most doubling per step
        previous = n
    assert "concurrent requests > target 2" in changes[0][2]


def test_cooldowns_are_honoured():
    policy = AutoscalePolicy(target_concurrency=1, scale_up_cooldown_s=30, scale_down_cooldown_s=120, window_s=5)
    changes = simulate(lambda t: 20.0 if (t // 400) % 2 == 0 else 0.5, policy, 1, 20, 2400)
    ups = [t for (t, n, _), prev in zip(changes, [1] + [c[1] for c in changes]) if n > prev]
    downs = [t for (t, n, _), prev in zip(changes, [1] + [c[1] for c in changes]) if n < prev]
    assert ups and downs
    assert all(b - a >= 30 for a, b in zip(ups, ups[1:]) if b - a < 300)
    assert all(b - a >= 120 for a, b in zip(downs, downs[1:]))


def test_diurnal_load_is_tracked_without_leaving_bounds():
    policy = AutoscalePolicy(target_concurrency=4, scale_down_cooldown_s=60)
    day = 3600

    def load(t: int) -> float:
        return 10 + 9 * math.sin(2 * math.pi * t / day)

    changes = simulate(load, policy, 1, 6, 2 * day)
    counts = [n for _, n, _ in changes]
    assert max(counts) == 5  # ceil(19 / 4)
    assert min(counts) == 1
    assert len(changes) < 40  # follows the curve, does not chatter


def test_scale_to_zero_after_idle_and_back_on_demand():
    policy = AutoscalePolicy(scale_to_zero_after_s=300)
    changes = simulate(lambda t: 1.0 if t < 60 else 0.0, policy, 0, 2, 500)
    assert changes[-1][1] == 0 and 59 + 300 <= changes[-1][0] <= 61 + 300
    assert "no request for" in changes[-1][2]
    d, _ = decide(policy, 0, 2, 0, Signals(0, 0, None, idle_s=1000, pending=1), 0, 0, 0, None)
    assert d.desired == 1 and "cold start" in d.reason
    d, _ = decide(policy, 0, 2, 0, Signals(0, 0, None, idle_s=1000, pending=0), 0, 0, 0, None)
    assert d.desired == 0


def test_queue_and_ttft_pressure_add_replicas():
    policy = AutoscalePolicy(target_concurrency=100, target_queue_depth=2, max_ttft_p95_ms=500)
    d, _ = decide(policy, 1, 4, 1, Signals(3, 10, None, 0), 100, -1e9, -1e9, None)
    assert d.desired == 2 and "queue depth" in d.reason
    d, _ = decide(policy, 1, 4, 2, Signals(3, 0, 900.0, 0), 100, -1e9, -1e9, None)
    assert d.desired == 3 and "p95 TTFT" in d.reason


def test_bounds_apply_immediately_after_a_patch():
    policy = AutoscalePolicy()
    assert decide(policy, 1, 2, 5, Signals(50, 0, None, 0), 0, 0, 0, None)[0].desired == 2
    assert decide(policy, 3, 5, 1, Signals(0, 0, None, 0), 0, 0, 0, None)[0].desired == 3
