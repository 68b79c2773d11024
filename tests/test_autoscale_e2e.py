"""Autoscaling end to end with real local replicas: start at zero, cold-start the first request,
scale to 2 under load, back to 0 when idle, with no failed request."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from tests.net import free_port, wait_for
from tests.test_platform_e2e import _start_up, platform_home  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


def test_scale_from_zero_to_two_and_back(platform_home, tmp_path):  # noqa: F811
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    up = _start_up(platform_home, port, tmp_path / "up.log")
    try:
        wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200, 60, "the platform")
        r = httpx.post(f"{base}/api/v1/deployments", json={
            "name": "elastic", "model": "default", "max_model_len": 512, "replicas": {"min": 0, "max": 2},
            "autoscale": {"target_concurrency": 2, "scale_up_cooldown_s": 2, "scale_down_cooldown_s": 5,
                          "scale_to_zero_after_s": 15, "window_s": 3}})
        assert r.status_code == 201, r.text
        wait_for(lambda: httpx.get(f"{base}/api/v1/deployments/elastic").json()["status"] == "scaled_to_zero", 30,
              "scaled_to_zero at start")

        # the first request is held while a replica starts (cold start), then served
        t0 = time.time()
        first = httpx.post(f"{base}/v1/chat/completions", timeout=180, json={
            "model": "elastic", "temperature": 0, "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert first.status_code == 200, first.text
        assert first.json()["choices"][0]["message"]["content"] == "The capital of France is Paris."
        assert time.time() - t0 > 1  # it really waited for a model load
        point = wait_for(lambda: httpx.get(f"{base}/api/v1/deployments/elastic/metrics").json()["current"], 30, "metrics")
        wait_for(lambda: httpx.get(f"{base}/api/v1/deployments/elastic/metrics").json()["current"].get("cold_start_ms"),
              30, "the cold start to be reported")

        # 8 concurrent long streams at target concurrency 2 -> 2 replicas (the max); long enough (440 tokens each)
        # that the load outlasts the second replica's model load on a busy 2-core machine
        results: list[int] = []

        def stream(i: int) -> None:
            with httpx.stream("POST", f"{base}/v1/completions", timeout=300, json={
                    "model": "elastic", "prompt": f"Story {i}:", "max_tokens": 440, "ignore_eos": True,
                    "stream": True}) as resp:
                done = resp.status_code == 200 and any(line == "data: [DONE]" for line in resp.iter_lines())
                results.append(resp.status_code if done else -1)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        try:
            wait_for(lambda: httpx.get(f"{base}/api/v1/deployments/elastic").json()["ready_replicas"] == 2, 240,
                  "scale-up to 2 replicas")
        except AssertionError as exc:
            events = httpx.get(f"{base}/api/v1/deployments/elastic/events").json()["events"]
            raise AssertionError(f"{exc}; results so far {results}; events {[e['message'] for e in events]}") from None
        for th in threads:
            th.join(300)
        assert results == [200] * 8  # no failed request

        events = [e["message"] for e in httpx.get(f"{base}/api/v1/deployments/elastic/events").json()["events"]]
        assert any(m.startswith("scaled 1 -> 2:") and "concurrent requests > target 2" in m for m in events), events
        # idle -> back to zero
        wait_for(lambda: httpx.get(f"{base}/api/v1/deployments/elastic").json()["status"] == "scaled_to_zero", 120,
              "scale to zero when idle")
        events = [e["message"] for e in httpx.get(f"{base}/api/v1/deployments/elastic/events").json()["events"]]
        assert any("-> 0: no request for" in m for m in events)
        assert point is not None
    finally:
        os.killpg(up.pid, signal.SIGKILL)
        up.wait()
        for line in os.popen("pgrep -f 'served-model-name elastic'").read().split():
            try:
                os.kill(int(line), signal.SIGKILL)
            except ProcessLookupError:
                pass
