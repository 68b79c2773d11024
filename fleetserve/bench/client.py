"""The HTTP side of the benchmark: streaming OpenAI-compatible requests with per-chunk timestamps.

Every request streams (``stream: true``) and asks for a final usage chunk
(``stream_options.include_usage``). Token counts come from ``usage`` when the server sends it, else
from the tokenizer (the prompt's count from the workload, the output's from the streamed text).

Each failed request gets one error type: ``http_<status>`` (a non-200 answer, e.g. ``http_429``),
``timeout`` (no complete answer within ``--timeout`` seconds), ``connection_error`` (cannot connect, or
the connection broke mid-stream), ``stream_error`` (the server sent an error event in the stream) or
``invalid_response`` (a body or chunk that is not OpenAI-shaped JSON).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from fleetserve.bench.metrics import RequestRecord

if TYPE_CHECKING:
    from fleetserve.bench.datasets import BenchRequest
    from fleetserve.tokenizer import Tokenizer

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


class BenchSetupError(Exception):
    """The benchmark cannot start (endpoint unreachable, no model); the message says what to do."""


@dataclass
class Target:
    """One endpoint under test."""

    label: str  # "A" or "B"
    url: str  # base URL, without /v1
    model: str | None = None
    api_key: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "url": self.url, "model": self.model}


def base_url(url: str) -> str:
    """``http://host:8000``, ``http://host:8000/`` and ``http://host:8000/v1`` all mean the same server."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise BenchSetupError(f"--url must start with http:// or https://, got {url!r}")
    return url.removesuffix("/v1")


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def discover_model(url: str, api_key: str | None, timeout: float = 30.0) -> str:
    """The first model id of ``GET /v1/models``."""
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            resp = await client.get(f"{url}/v1/models", headers=_headers(api_key))
    except httpx.HTTPError as exc:
        raise BenchSetupError(f"cannot reach {url}/v1/models ({type(exc).__name__}: {exc}); is the server "
                              "running? Pass --model to skip model discovery") from exc
    if resp.status_code != 200:
        raise BenchSetupError(f"GET {url}/v1/models answered {resp.status_code}: {resp.text[:200]}; "
                              "pass --api-key if the server needs one, or --model NAME")
    try:
        return resp.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchSetupError(f"GET {url}/v1/models listed no model ({resp.text[:200]}); pass --model NAME") from None


def _error_message(body: bytes) -> str:
    try:
        data = json.loads(body)
        err = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)[:500]
        return str(err)[:500]
    except ValueError:
        return body.decode("utf-8", "replace")[:500]


class HTTPClient:
    """Sends workload requests to one target and returns a :class:`RequestRecord` for each."""

    def __init__(self, target: Target, endpoint: str, tokenizer: Tokenizer, *, timeout: float = 600.0,
                 ignore_eos: bool = False, temperature: float | None = 0.0,
                 extra_body: dict[str, Any] | None = None):
        if endpoint not in ENDPOINTS:
            raise BenchSetupError(f"unknown endpoint {endpoint!r}; allowed: {', '.join(ENDPOINTS)}")
        self.target, self.endpoint, self.tokenizer = target, endpoint, tokenizer
        self.timeout, self.ignore_eos, self.temperature = timeout, ignore_eos, temperature
        self.extra_body = extra_body or {}
        self.api_url = target.url + ENDPOINTS[endpoint]
        self.prompt_len_mismatches = 0  # completions requests whose usage.prompt_tokens differ from ours
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout), headers=_headers(target.api_key),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))

    async def aclose(self) -> None:
        await self._client.aclose()

    def payload(self, req: BenchRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.target.model, "max_tokens": req.output_len, "stream": True,
                                "stream_options": {"include_usage": True}}
        if self.endpoint == "completions":
            body["prompt"] = req.prompt_token_ids if req.prompt_token_ids is not None else req.prompt
        else:
            body["messages"] = req.messages
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.ignore_eos:
            body["ignore_eos"] = True
            body["min_tokens"] = req.output_len
        body.update(self.extra_body)
        return body

    async def send(self, req: BenchRequest) -> RequestRecord:
        rec = RequestRecord(index=req.index, start=time.perf_counter(), end=0.0, prompt_len=req.prompt_len,
                            output_len=req.output_len)
        text: list[str] = []
        try:
            async with asyncio.timeout(self.timeout):
                await self._stream(req, rec, text)
        except (TimeoutError, httpx.TimeoutException) as exc:
            rec.success, rec.error_type = False, "timeout"
            rec.error = f"no complete answer within {self.timeout:g} s" + (f" ({exc})" if str(exc) else "")
        except httpx.TransportError as exc:
            rec.success, rec.error_type, rec.error = False, "connection_error", f"{type(exc).__name__}: {exc}"
        except (httpx.HTTPError, ValueError, TypeError, KeyError) as exc:  # undecodable body, odd usage
            rec.success, rec.error_type, rec.error = False, "invalid_response", f"{type(exc).__name__}: {exc}"
        rec.end = time.perf_counter()
        if rec.success and not rec.usage_reported:
            rec.output_tokens = len(self.tokenizer.encode("".join(text), add_special_tokens=False)) if text else 0
        return rec

    async def _stream(self, req: BenchRequest, rec: RequestRecord, text: list[str]) -> None:
        async with self._client.stream("POST", self.api_url, json=self.payload(req)) as resp:
            if resp.status_code != 200:
                body = await resp.aread()
                rec.success, rec.error_type = False, f"http_{resp.status_code}"
                rec.error = _error_message(body)
                return
            async for line in resp.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue  # blank separators, comments (": ping"), "event:" lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    rec.success, rec.error_type, rec.error = False, "invalid_response", f"not JSON: {data[:200]}"
                    return
                if not isinstance(chunk, dict):
                    rec.success, rec.error_type, rec.error = False, "invalid_response", f"not an object: {data[:200]}"
                    return
                if chunk.get("error") is not None:
                    rec.success, rec.error_type = False, "stream_error"
                    rec.error = _error_message(json.dumps(chunk).encode())
                    return
                piece = self._chunk_text(chunk)
                if piece:
                    rec.chunk_times.append(now)
                    text.append(piece)
                usage = chunk.get("usage")
                if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                    self._take_usage(req, rec, usage)

    def _chunk_text(self, chunk: dict[str, Any]) -> str:
        choices = chunk.get("choices") or []
        if not choices or not isinstance(choices[0], dict):
            return ""
        if self.endpoint == "completions":
            return choices[0].get("text") or ""
        delta = choices[0].get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")

    def _take_usage(self, req: BenchRequest, rec: RequestRecord, usage: dict[str, Any]) -> None:
        rec.usage_reported = True
        rec.output_tokens = int(usage["completion_tokens"])
        if usage.get("prompt_tokens") is not None:
            rec.prompt_len = int(usage["prompt_tokens"])
            if self.endpoint == "completions" and rec.prompt_len != req.prompt_len:
                self.prompt_len_mismatches += 1
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            rec.cached_tokens = int(details["cached_tokens"])
