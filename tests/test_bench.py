"""`fleetserve bench`: metric arithmetic (exactly on synthetic records, and against a scripted server whose
delays imply every number), failures by type, workloads, arrivals, and end to end against a live
fleetserve worker (single, A/B, offline)."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from typer.testing import CliRunner

from fleetserve.bench.arrival import Level, arrival_offsets, parse_levels
from fleetserve.bench.client import BenchSetupError, HTTPClient, Target
from fleetserve.bench.datasets import BenchRequest, PromptsWorkload, RandomWorkload, SharedPrefixWorkload
from fleetserve.bench.metrics import SLO, RequestRecord, distribution, percentile, ratios, summarize
from fleetserve.bench.report import tables, to_json, write_plots
from fleetserve.bench.runner import BenchConfig, run
from fleetserve.cli import app
from tests.net import free_port, serve_in_thread

TOL = 0.015  # seconds: scheduling jitter allowed on one timed value (the server sleeps to absolute deadlines)
# These tests check that the bench measures wall-clock time right, so they compare against it: a machine that
# stalls the process mid-run (a loaded CI host once stalled one for ~0.5 s) shifts a measurement, while a bench
# that measures wrong fails every rerun.
WALL_CLOCK = pytest.mark.flaky(reruns=2)
runner = CliRunner()




# ---------------------------------------------------------------- the scripted server


def _script(text: str) -> dict[str, int]:
    """A prompt like "ttft=100 itl=20 n=5" (ms, tokens); also status=500, error_after=2, usage=0."""
    out = {"ttft": 100, "itl": 20, "n": 5, "usage": 1}
    for part in text.split():
        key, _, value = part.partition("=")
        out[key] = int(value)
    return out


def scripted_app() -> FastAPI:
    """Streams OpenAI-shaped chunks at the delays each prompt asks for, measured from the request's arrival."""
    fake = FastAPI()
    seen: list[dict] = []
    fake.state.seen = seen
    fake.state.arrived = {}  # prompt -> perf_counter when the handler started (same clock as the client's)

    @fake.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "scripted", "object": "model"}]}

    async def respond(request: Request, chat: bool):
        t0 = time.perf_counter()
        body = await request.json()
        seen.append(body)
        text = body["messages"][-1]["content"] if chat else body["prompt"]
        fake.state.arrived[text] = t0
        s = _script(text)
        if "status" in s:
            return JSONResponse({"error": {"message": f"scripted {s['status']}", "type": "x", "param": None,
                                           "code": s["status"]}}, status_code=s["status"])
        n = min(s["n"], body["max_tokens"])
        usage_on = s["usage"] and (body.get("stream_options") or {}).get("include_usage")

        def chunk(piece: str) -> str:
            choice = ({"index": 0, "delta": {"content": piece}, "finish_reason": None} if chat
                      else {"index": 0, "text": piece, "finish_reason": None})
            return "data: " + json.dumps({"id": "x", "choices": [choice]}) + "\n\n"

        async def gen():
            if chat:  # a role-only first chunk carries no output: it must not end TTFT
                yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
                yield "\n\n"
            for k in range(n):
                await asyncio.sleep(max(0.0, t0 + (s["ttft"] + k * s["itl"]) / 1000 - time.perf_counter()))
                yield chunk(" the")
                if s.get("error_after") == k + 1:
                    yield "data: " + json.dumps({"error": {"message": "scripted failure", "code": 500}}) + "\n\n"
                    yield "data: [DONE]\n\n"
                    return
            if usage_on:
                yield "data: " + json.dumps({"choices": [], "usage": {
                    "prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    @fake.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, chat=False)

    @fake.post("/v1/chat/completions")
    async def chat(request: Request):
        return await respond(request, chat=True)

    return fake


@pytest.fixture(scope="module")
def scripted():
    app_ = scripted_app()
    with serve_in_thread(app_) as url:
        app_.state.url = url
        yield app_


def prompts_file(tmp_path: Path, prompts: list[str]) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "output_len": 16}) + "\n" for p in prompts))
    return path


def config(url: str, path: Path, **kw) -> BenchConfig:
    base = {"url": url, "dataset": "prompts", "dataset_path": str(path), "warmup": 0, "progress": False,
            "num_prompts": 5, "levels": [Level(concurrency=5)]}
    return BenchConfig(**{**base, **kw})


# ---------------------------------------------------------------- metrics, exactly


def rec(i: int, start: float, chunks: list[float], end: float, out: int, **kw) -> RequestRecord:
    return RequestRecord(index=i, start=start, end=end, chunk_times=chunks, output_tokens=out, prompt_len=10, **kw)


def test_metrics_exact_on_synthetic_records():
    """Dyadic timestamps make every figure exact in binary floating point: no tolerance anywhere."""
    records = [
        # TTFT 125 ms, chunks every 31.25 ms, 4 tokens, e2e 250 ms -> TPOT (250 - 125) / 3 ms
        rec(0, 1.0, [1.125, 1.15625, 1.1875, 1.21875], 1.25, 4),
        # TTFT 250 ms, 3 chunks 62.5 ms apart, e2e 375 ms, 3 tokens -> TPOT (375 - 250) / 2 = 62.5 ms
        rec(1, 1.5, [1.75, 1.8125, 1.875], 1.875, 3),
        # one token: no ITL, no TPOT; TTFT 500, e2e 500
        rec(2, 2.0, [2.5], 2.5, 1),
        # failures count only by type
        RequestRecord(index=3, start=1.0, end=1.5, success=False, error_type="http_500"),
        RequestRecord(index=4, start=1.0, end=1.5, success=False, error_type="http_429"),
        RequestRecord(index=5, start=1.0, end=3.0, success=False, error_type="http_500"),
    ]
    s = summarize(records, duration=2.0, slo=SLO(ttft_ms=250, tpot_ms=50))
    assert s["completed"] == 3 and s["failed"] == 3
    assert s["errors"] == {"http_429": 1, "http_500": 2}
    assert s["total_input_tokens"] == 30 and s["total_output_tokens"] == 8
    assert s["request_throughput"] == 1.5
    assert s["input_throughput"] == 15.0 and s["output_throughput"] == 4.0 and s["total_token_throughput"] == 19.0

    # TTFT [125, 250, 500]: mean 291.666.., median 250, p90 at rank 1.8 = 250 + 0.8 * 250
    assert s["ttft_ms"]["count"] == 3
    assert s["ttft_ms"]["mean"] == (125 + 250 + 500) / 3
    assert s["ttft_ms"]["median"] == 250.0
    assert s["ttft_ms"]["p90"] == 250 + 0.8 * 250 == 450.0
    assert s["ttft_ms"]["p95"] == 250 + 0.9 * 250 == 475.0
    assert s["ttft_ms"]["p99"] == 250 + 0.98 * 250
    assert s["ttft_ms"]["max"] == 500.0
    # TPOT [41.666.., 62.5]
    assert s["tpot_ms"]["count"] == 2
    assert s["tpot_ms"]["median"] == (125 / 3 + 62.5) / 2
    assert s["tpot_ms"]["max"] == 62.5
    # ITL: three gaps of 31.25 and two of 62.5 (ranks 3.6, 3.8, 3.96 fall between the two 62.5s)
    assert s["itl_ms"] == {"count": 5, "mean": 43.75, "median": 31.25, "p90": 62.5, "p95": 62.5, "p99": 62.5,
                           "max": 62.5}
    # E2E [250, 375, 500]
    assert s["e2e_ms"]["median"] == 375.0 and s["e2e_ms"]["mean"] == 375.0 and s["e2e_ms"]["p90"] == 475.0
    # SLO ttft <= 250 and tpot <= 50: request 0 only (1 misses TPOT; 2 misses TTFT)
    assert s["good_requests"] == 1 and s["goodput"] == 0.5
    assert summarize(records, duration=2.0, slo=SLO(ttft_ms=500))["good_requests"] == 3
    # one-token requests meet any TPOT SLO; e2e SLO applies to everything
    assert summarize(records, duration=2.0, slo=SLO(tpot_ms=1, e2e_ms=500))["good_requests"] == 1
    # no SLO: no goodput; default duration is the records' span (1.0 .. 3.0)
    s2 = summarize(records)
    assert s2["goodput"] is None and s2["duration_s"] == 2.0


def test_percentile_definition_is_numpy_linear():
    values = [0.0, 1000.0, 2000.0]
    assert percentile(values, 90) == 1800.0 == np.percentile(values, 90)
    values = list(range(101))
    d = distribution([float(v) for v in values])
    assert (d["median"], d["p90"], d["p95"], d["p99"], d["max"]) == (50.0, 90.0, 95.0, 99.0, 100.0)
    assert distribution([]) == {"count": 0, "mean": None, "median": None, "p90": None, "p95": None, "p99": None,
                                "max": None}
    assert ratios({"a": 2.0, "b": {"c": 4}, "z": 0}, {"a": 3.0, "b": {"c": 2}, "z": 5}) == {
        "a": 1.5, "b.c": 0.5, "z": None}


def test_slo_parsing():
    assert SLO.parse("ttft_ms=500, tpot_ms=50") == SLO(ttft_ms=500, tpot_ms=50)
    assert SLO.parse(None) is None
    for bad in ("ttft=5", "ttft_ms", "ttft_ms=x", "e2e_ms=-1"):
        with pytest.raises(ValueError, match="slo"):
            SLO.parse(bad)


# ---------------------------------------------------------------- against the scripted server


@WALL_CLOCK
def test_timings_match_the_delays_the_server_scripts(scripted, tmp_path, tokenizer):
    """TTFT 100..300 ms, then a token every 20 ms, 5 tokens: every figure follows from the delays."""
    prompts = [f"ttft={t} itl=20 n=5" for t in (100, 150, 200, 250, 300)]
    path = prompts_file(tmp_path, prompts)
    # warm-up opens the 5 keep-alive connections, so no request pays a TCP connect
    result = run(config(scripted.state.url, path, slo=SLO(ttft_ms=225), warmup=5), tokenizer=tokenizer)
    s = result.levels[0].summaries["A"]
    # The server's delays start when its handler runs; the client's clock starts before the request is
    # sent. Each request's transport time (same process, same clock) is measured, not guessed.
    transport = {}
    for r in result.levels[0].runs["A"].records:
        transport[r.index] = scripted.state.arrived[prompts[r.index]] - r.start
        assert 0 <= transport[r.index] < 0.25
        assert abs(r.ttft - transport[r.index] - (0.1 + 0.05 * r.index)) <= TOL, (r.index, r.ttft, transport)
        assert abs(r.e2e - r.ttft - 0.08) <= TOL
    slack = max(transport.values()) * 1000  # on aggregates, on top of the jitter allowance
    assert s["completed"] == 5 and s["failed"] == 0 and s["errors"] == {}
    assert s["total_output_tokens"] == 25 and s["usage_reported"] == 5
    assert s["total_input_tokens"] == 35  # usage.prompt_tokens (7 each) wins over the tokenizer's count
    ms = TOL * 1000
    ttft = s["ttft_ms"]
    expected = {"mean": 200, "median": 200, "p90": 280, "p95": 290, "p99": 298, "max": 300}
    for key, value in expected.items():
        assert -ms <= ttft[key] - value <= ms + slack, (key, ttft)
    for key, value in expected.items():  # E2E = TTFT + 4 x 20 ms
        assert -ms <= s["e2e_ms"][key] - (value + 80) <= ms + slack, (key, s["e2e_ms"])
    assert s["itl_ms"]["count"] == 20
    for key in ("mean", "median", "p90", "p95", "p99", "max"):
        assert abs(s["itl_ms"][key] - 20) <= ms, (key, s["itl_ms"])
        assert abs(s["tpot_ms"][key] - 20) <= ms / 4 + 1, (key, s["tpot_ms"])
    # all sent at once: the run lasts as long as the slowest request
    assert -TOL <= s["duration_s"] - 0.38 <= 3 * TOL + slack / 1000
    assert s["request_throughput"] == 5 / s["duration_s"]
    assert s["output_throughput"] == 25 / s["duration_s"]
    # SLO TTFT <= 225 ms: the 100, 150 and 200 ms requests
    assert s["good_requests"] == 3 and s["goodput"] == 3 / s["duration_s"]
    body = scripted.state.seen[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "scripted"  # discovered from GET /v1/models
    assert "ignore_eos" not in body


@WALL_CLOCK
def test_failures_are_counted_by_type(scripted, tmp_path, tokenizer):
    path = prompts_file(tmp_path, ["ttft=10 itl=5 n=3", "status=500", "status=429", "ttft=10 itl=5 n=4 error_after=2",
                                   "ttft=3000 n=2", "status=500"])
    result = run(config(scripted.state.url, path, num_prompts=6, timeout=0.5, levels=[Level(6)]), tokenizer=tokenizer)
    s = result.levels[0].summaries["A"]
    assert s["completed"] == 1 and s["failed"] == 5
    assert s["errors"] == {"http_429": 1, "http_500": 2, "stream_error": 1, "timeout": 1}
    records = {r.index: r for r in result.levels[0].runs["A"].records}
    assert "scripted 500" in records[1].error
    assert records[4].e2e == pytest.approx(0.5, abs=0.1)
    # nothing listening: connection errors (and no model discovery when --model is given)
    closed = f"http://127.0.0.1:{free_port()}"
    result = run(config(closed, path, model="m", num_prompts=2), tokenizer=tokenizer)
    assert result.levels[0].summaries["A"]["errors"] == {"connection_error": 2}
    with pytest.raises(BenchSetupError, match="every warm-up request to endpoint A failed; the first with "
                                               "connection_error"):
        run(config(closed, path, model="m", warmup=1), tokenizer=tokenizer)


@WALL_CLOCK
def test_tokens_counted_by_tokenizer_without_usage_and_chat_ttft(scripted, tmp_path, tokenizer):
    path = prompts_file(tmp_path, ["ttft=50 itl=10 n=6 usage=0"] * 2)
    for endpoint in ("completions", "chat"):
        result = run(config(scripted.state.url, path, num_prompts=2, endpoint=endpoint), tokenizer=tokenizer)
        s = result.levels[0].summaries["A"]
        assert s["completed"] == 2 and s["usage_reported"] == 0
        assert s["total_output_tokens"] == 12  # " the" x 6, counted by the tokenizer
        assert s["total_input_tokens"] == 2 * len(tokenizer.encode("ttft=50 itl=10 n=6 usage=0"))
        assert abs(s["ttft_ms"]["median"] - 50) <= TOL * 1000  # the chat role chunk does not count
    assert scripted.state.seen[-1]["messages"] == [{"role": "user", "content": "ttft=50 itl=10 n=6 usage=0"}]


@WALL_CLOCK
def test_request_rate_dispatches_at_the_seeded_arrival_times(scripted, tmp_path, tokenizer):
    path = prompts_file(tmp_path, ["ttft=5 itl=5 n=2"])
    cfg = config(scripted.state.url, path, num_prompts=8, seed=3, levels=[Level(None, 20.0)], burstiness=2.0)
    result = run(cfg, tokenizer=tokenizer)
    lr = result.levels[0]
    starts = sorted(r.start - lr.t0 for r in lr.runs["A"].records)
    expected = [next(o) for o in [arrival_offsets(20.0, 2.0, 3)] for _ in range(8)]
    # never early; late only by scheduling jitter
    assert all(-0.001 <= a - b <= TOL for a, b in zip(starts, expected)), (starts, expected)


def test_sweep_duration_chat_and_reports(scripted, tmp_path, tokenizer):
    path = prompts_file(tmp_path, ["ttft=20 itl=5 n=3"])
    result = run(config(scripted.state.url, path, num_prompts=4, levels=parse_levels("1,4", None)),
                 tokenizer=tokenizer)
    assert [lr.level for lr in result.levels] == [Level(1), Level(4)]
    # concurrency 1: requests run one after another
    recs = sorted(result.levels[0].runs["A"].records, key=lambda r: r.start)
    assert all(b.start >= a.end for a, b in zip(recs, recs[1:]))
    doc = to_json(result)
    assert [lv["concurrency"] for lv in doc["levels"]] == [1, 4]
    assert all(lv["results"]["A"]["completed"] == 4 for lv in doc["levels"])
    throughput, latency = tables(result)  # one row per level in each
    assert throughput.row_count == latency.row_count == 2
    paths = write_plots(result, tmp_path / "plots")
    assert {p.name for p in paths} == {"latency_cdf.png", "throughput.png", "sweep.png"}
    assert all(p.stat().st_size > 5000 for p in paths)
    # --duration: requests keep going for the window, then in-flight ones finish
    result = run(config(scripted.state.url, path, duration=0.5, endpoint="chat", levels=[Level(2)]),
                 tokenizer=tokenizer)
    s = result.levels[0].summaries["A"]
    assert s["failed"] == 0 and s["completed"] >= 6
    # no request is sent after the window; the duration runs to the last one's finish (timing-free: a loaded
    # machine stretches requests, never the rule)
    [(b0, b1)] = result.levels[0].runs["A"].blocks
    recs = result.levels[0].runs["A"].records
    assert all(r.start < b0 + 0.5 for r in recs)
    assert b1 == max(r.end for r in recs) and b1 - b0 >= 0.5
    assert s["duration_s"] == b1 - b0
    # --duration with --compare: each round gives each endpoint duration / rounds from the same request
    result = run(config(scripted.state.url, path, duration=0.4, compare=scripted.state.url + "/v1", rounds=2,
                        levels=[Level(2)]), tokenizer=tokenizer)
    [lr] = result.levels
    assert len(lr.runs["A"].blocks) == len(lr.runs["B"].blocks) == 2
    a_idx, b_idx = ({r.index for r in lr.runs[x].records} for x in ("A", "B"))
    assert min(len(a_idx), len(b_idx)) >= 4 and 0 in a_idx & b_idx
    assert lr.summaries["A"]["failed"] == lr.summaries["B"]["failed"] == 0


def test_cli_flags_and_errors(scripted, tmp_path):
    r = runner.invoke(app, ["bench", "--help"], terminal_width=120)
    assert r.exit_code == 0
    for text in ("Examples", "--compare", "--offline", "--prompt-len", "--slo", "schema_version"):
        assert text in r.output
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom fleetserve.cli import app\n"
            "assert CliRunner().invoke(app, ['bench', '--help']).exit_code == 0\n"
            "print(sorted(m for m in ('torch', 'numpy', 'httpx', 'matplotlib', 'fleetserve.bench.runner') "
            "if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", "bench --help must stay light"
    bad = [
        (["bench", "--url", scripted.state.url, "--dataset", "nope"], "--dataset must be one of"),
        (["bench", "--url", scripted.state.url, "--duration", "5"], "--duration needs --concurrency"),
        (["bench", "--url", scripted.state.url, "--concurrency", "0.5"], "--concurrency takes"),
        (["bench", "--url", scripted.state.url, "--slo", "ttft=1"], "--slo"),
        (["bench", "--url", scripted.state.url, "--dataset", "sharegpt"], "--dataset-path"),
        (["bench"], "--url is required"),
        (["bench", "--offline", "--compare", "http://x"], "cannot be combined"),
    ]
    for args, message in bad:
        r = runner.invoke(app, args, terminal_width=200)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output.replace("\n", " "), (args, r.output)


# ---------------------------------------------------------------- workloads and arrivals


def test_random_prompts_have_exact_lengths_and_are_seeded(tokenizer):
    w = RandomWorkload(tokenizer, input_len=37, output_len=9, seed=5)
    reqs = [w.request(i, 1) for i in range(6)]
    for r in reqs:
        assert r.prompt_len == 37 and r.output_len == 9
        assert r.prompt_token_ids == tokenizer.encode(r.prompt) and len(r.prompt_token_ids) == 37
    assert len({r.prompt for r in reqs}) == 6
    again = RandomWorkload(tokenizer, input_len=37, output_len=9, seed=5)
    assert [again.request(i, 1).prompt for i in range(6)] == [r.prompt for r in reqs]
    assert RandomWorkload(tokenizer, 37, 9, seed=6).request(0, 1).prompt != reqs[0].prompt
    assert w.request(0, 2).prompt != reqs[0].prompt  # each sweep level draws fresh prompts
    ranged = RandomWorkload(tokenizer, input_len=100, output_len=20, range_ratio=0.5, seed=1)
    lens = [ranged.request(i, 1) for i in range(20)]
    assert all(50 <= r.prompt_len <= 150 and 10 <= r.output_len <= 30 for r in lens)
    assert all(len(tokenizer.encode(r.prompt)) == r.prompt_len for r in lens)
    assert len({r.prompt_len for r in lens}) > 5


def test_shared_prefix_and_prompt_files(tokenizer, tmp_path):
    w = SharedPrefixWorkload(tokenizer, num_groups=2, prefix_len=40, suffix_len=8, output_len=4, seed=0)
    reqs = [w.request(i, 1) for i in range(4)]
    assert all(r.prompt_len == 48 == len(r.prompt_token_ids) for r in reqs)
    assert reqs[0].prompt_token_ids[:40] == reqs[2].prompt_token_ids[:40]
    assert reqs[0].prompt_token_ids[:40] != reqs[1].prompt_token_ids[:40]
    assert reqs[0].messages[0]["role"] == "system" and reqs[0].messages[0]["content"] == reqs[2].messages[0]["content"]
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hello there"}\n\n{"prompt": [1, 2, 3], "output_len": 7}\n')
    pw = PromptsWorkload(path, tokenizer, output_len=11)
    a, b, c = pw.request(0, 1), pw.request(1, 1), pw.request(2, 1)
    assert (a.output_len, a.prompt_len, b.output_len, b.prompt_token_ids) == (11, 2, 7, [1, 2, 3])
    assert c.prompt == a.prompt  # cycles
    assert pw.request(0, 0).prompt_token_ids == [1, 2, 3]  # warm-up takes lines from the end
    sharegpt = tmp_path / "sg.json"
    sharegpt.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "Tell me a story about a dragon please."},
                           {"from": "gpt", "value": "Once upon a time there was a dragon who loved tea."}]},
        {"conversations": [{"from": "human", "value": "hi"}]},  # one turn: skipped
    ]))
    from fleetserve.bench.datasets import ShareGPTWorkload

    sg = ShareGPTWorkload(sharegpt, tokenizer, seed=0).request(0, 1)
    assert sg.prompt.startswith("Tell me")
    assert sg.output_len == len(tokenizer.encode("Once upon a time there was a dragon who loved tea.",
                                                 add_special_tokens=False))
    assert ShareGPTWorkload(sharegpt, tokenizer, output_len=5).request(3, 1).output_len == 5


def test_arrivals_are_seeded_gamma_with_the_requested_rate():
    def take(it, n):
        return [next(it) for _ in range(n)]

    a = take(arrival_offsets(10.0, 1.0, seed=1), 20000)
    assert a[0] == 0.0 and a == sorted(a)
    assert a == take(arrival_offsets(10.0, 1.0, seed=1), 20000)
    assert a[:50] != take(arrival_offsets(10.0, 1.0, seed=2), 50)
    gaps = np.diff(a)
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)
    assert gaps.std() == pytest.approx(0.1, rel=0.05)  # exponential: std = mean
    regular = np.diff(take(arrival_offsets(10.0, 4.0, seed=1), 20000))
    assert regular.mean() == pytest.approx(0.1, rel=0.03)
    assert regular.std() == pytest.approx(0.05, rel=0.05)  # gamma(k): std = mean / sqrt(k)
    assert take(arrival_offsets(math.inf), 3) == [0.0, 0.0, 0.0]
    assert parse_levels("1,4", "2,inf") == [Level(1, 2.0), Level(1, math.inf), Level(4, 2.0), Level(4, math.inf)]
    assert parse_levels(None, None) == [Level()]


# ---------------------------------------------------------------- a live fleetserve worker


@pytest.fixture(scope="module")
def worker(default_engine, tokenizer):
    from fleetserve.config import ServeConfig
    from fleetserve.models import resolve_model
    from fleetserve.server.app import create_app, new_state

    state = new_state(ServeConfig(), resolve_model("default", download=False))
    state.engine, state.tokenizer = default_engine, tokenizer
    with serve_in_thread(create_app(state, load=False)) as url:
        yield url


def test_live_worker_exact_counts_json_and_plots(worker, tmp_path):
    out, plots = tmp_path / "r.json", tmp_path / "plots"
    r = runner.invoke(app, ["bench", "--url", worker, "--num-prompts", "6", "--prompt-len", "24", "--output-len", "8",
                            "--ignore-eos", "--concurrency", "3", "--warmup", "1", "--slo", "ttft_ms=60000",
                            "--output", str(out), "--plot", str(plots), "--detailed", "--no-progress"],
                      terminal_width=160)
    assert r.exit_code == 0, r.output
    assert "Output throughput" in r.output and "TTFT" in r.output
    doc = json.loads(out.read_text())
    assert doc["schema_version"] == 1 and doc["mode"] == "online"
    assert doc["endpoints"] == [{"label": "A", "url": worker, "model": "HuggingFaceTB/SmolLM2-135M-Instruct"}]
    [level] = doc["levels"]
    assert level["concurrency"] == 3 and level["request_rate"] == "inf"
    s = level["results"]["A"]
    assert s["completed"] == 6 and s["failed"] == 0
    assert s["total_output_tokens"] == 48 and s["total_input_tokens"] == 6 * 24
    assert s["usage_reported"] == 6 and s["good_requests"] == 6
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(s[key]) == {"count", "mean", "median", "p90", "p95", "p99", "max"}
        assert 0 < s[key]["median"] <= s[key]["p99"] <= s[key]["max"]
    assert s["itl_ms"]["count"] == 6 * 7  # one token per chunk here
    for key in ("request_throughput", "input_throughput", "output_throughput", "goodput"):
        assert s[key] > 0
    reqs = level["requests"]["A"]
    assert len(reqs) == 6 and all(q["prompt_len"] == 24 and q["output_tokens"] == 8 for q in reqs)
    assert {p.name for p in plots.iterdir()} == {"latency_cdf.png", "throughput.png"}


def test_live_compare_side_by_side_with_ratios(worker, tokenizer):
    cfg = BenchConfig(url=worker, compare=worker + "/v1", input_len=16, output_len=4, ignore_eos=True,
                      num_prompts=4, rounds=2, levels=[Level(2)], warmup=1, progress=False)
    result = run(cfg, tokenizer=tokenizer)
    [lr] = result.levels
    a, b = lr.summaries["A"], lr.summaries["B"]
    assert a["completed"] == b["completed"] == 4 and a["total_output_tokens"] == b["total_output_tokens"] == 16
    assert lr.ratios["total_output_tokens"] == 1.0 and lr.ratios["completed"] == 1.0
    assert lr.ratios["ttft_ms.median"] == b["ttft_ms"]["median"] / a["ttft_ms"]["median"]
    # rounds alternate: A then B, then B then A; each round's blocks do not overlap
    (a1, a2), (b1, b2) = lr.runs["A"].blocks, lr.runs["B"].blocks
    assert a1[1] <= b1[0] and b1[1] <= b2[0] and b2[1] <= a2[0]
    # both endpoints got identical requests
    key = lambda r: r.index  # noqa: E731
    assert [r.index for r in sorted(lr.runs["A"].records, key=key)] == [0, 1, 2, 3]
    assert [r.prompt_len for r in sorted(lr.runs["A"].records, key=key)] == \
        [r.prompt_len for r in sorted(lr.runs["B"].records, key=key)]
    [table] = tables(result)
    assert [c.header for c in table.columns] == ["Metric", "A", "B", "B/A"]
    doc = to_json(result)
    assert set(doc["levels"][0]["results"]) == {"A", "B"} and doc["levels"][0]["ratios"]["completed"] == 1.0
    assert [e["label"] for e in doc["endpoints"]] == ["A", "B"]


def test_live_chat_endpoint_and_prompt_exactness(worker, tokenizer):
    """Token-id prompts reach the engine unchanged: the server's usage equals --input-len exactly."""
    w = RandomWorkload(tokenizer, input_len=20, output_len=3, seed=9)
    client_cfg = BenchConfig(url=worker, endpoint="chat", input_len=20, output_len=3, num_prompts=2, warmup=0,
                             progress=False, levels=[Level(2)])
    s = run(client_cfg, tokenizer=tokenizer).levels[0].summaries["A"]
    assert s["completed"] == 2 and s["total_input_tokens"] > 40  # the chat template adds tokens

    async def one():
        c = HTTPClient(Target("A", worker, "HuggingFaceTB/SmolLM2-135M-Instruct"), "completions", tokenizer,
                       ignore_eos=True)
        try:
            return await c.send(w.request(0, 1)), c.prompt_len_mismatches
        finally:
            await c.aclose()

    record, mismatches = asyncio.run(one())
    assert record.success and record.usage_reported and record.prompt_len == 20 and mismatches == 0
    assert record.output_tokens == 3 and len(record.chunk_times) == 3
    bogus = BenchRequest(0, "x", 1, 2, prompt_token_ids=[tokenizer.vocab_size + 5])
    bad = asyncio.run(_send(worker, tokenizer, bogus))
    assert not bad.success and bad.error_type == "http_400" and "out of range" in bad.error


def test_engine_client_chat_on_the_shared_engine(default_engine, tokenizer):
    """--offline --endpoint chat renders the chat template as the chat route does."""
    from fleetserve.bench.offline import EngineClient

    req = BenchRequest(0, "What is the capital of France?", 8, 3)
    client = EngineClient(default_engine, tokenizer, "chat", ignore_eos=True)
    record = asyncio.run(client.send(req))
    templated = tokenizer.encode(tokenizer.apply_chat_template(req.messages, add_generation_prompt=True),
                                 add_special_tokens=False)
    assert record.success and record.prompt_len == len(templated) and record.output_tokens == 3
    assert len(record.chunk_times) == 3 and record.ttft > 0


async def _send(url, tokenizer, req):
    c = HTTPClient(Target("A", url, "HuggingFaceTB/SmolLM2-135M-Instruct"), "completions", tokenizer)
    try:
        return await c.send(req)
    finally:
        await c.aclose()


def test_offline_engine_on_the_default_model(tmp_path):
    out = tmp_path / "offline.json"
    r = runner.invoke(app, ["bench", "--offline", "--model", "default", "--device", "cpu", "--num-prompts", "3",
                            "--input-len", "16", "--output-len", "4", "--ignore-eos", "--concurrency", "3",
                            "--max-model-len", "256", "--max-running-seqs", "4", "--warmup", "1",
                            "--output", str(out), "--no-progress"], terminal_width=160)
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["mode"] == "offline" and doc["engine"]["device"] == "cpu" and doc["engine"]["precision"] == "float32"
    s = doc["levels"][0]["results"]["A"]
    assert s["completed"] == 3 and s["total_output_tokens"] == 12 and s["total_input_tokens"] == 48
    assert s["itl_ms"]["count"] == 9 and s["tpot_ms"]["count"] == 3 and s["output_throughput"] > 0
