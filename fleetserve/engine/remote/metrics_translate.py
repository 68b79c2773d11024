"""SGLang / vLLM Prometheus metrics -> fleetserve's series (DESIGN.md "Metrics with a remote engine").

The worker's `/metrics` carries the engines' own series unchanged (`sglang:*`, `vllm:*`; with several
engine processes each sample gets a `process="<process name>"` label so families do not collide),
plus fleetserve's names computed from them, so dashboards and the autoscaler read one vocabulary:

  fleetserve_num_requests_running   <- sglang:num_running_reqs      | vllm:num_requests_running   (sum)
  fleetserve_num_requests_waiting   <- sglang:num_queue_reqs        | vllm:num_requests_waiting   (sum)
  fleetserve_queue_depth            =  running + waiting
  fleetserve_kv_cache_usage         <- sglang:token_usage           | vllm:kv_cache_usage_perc    (max)
  fleetserve_prefix_cache_hit_rate  <- sglang:cache_hit_rate        | vllm:prefix_cache_hits/queries
  fleetserve_tokens_per_second      <- sglang:gen_throughput        (sum)
  fleetserve_prompt_tokens_total    <- sglang:prompt_tokens_total   | vllm:prompt_tokens_total
  fleetserve_generation_tokens_total<- sglang:generation_tokens_total | vllm:generation_tokens_total
  fleetserve_time_to_first_token_seconds, _inter_token_latency_seconds, _e2e_request_latency_seconds
                                    <- the engines' histograms of the same meaning (buckets summed)
  fleetserve_spec_accept_rate       <- sglang:spec_accept_rate (or accept length) | vllm accepted/draft tokens
  fleetserve_spec_accept_length     <- sglang:spec_accept_length

In PD mode the running/waiting/usage gauges cover every engine (prefill and decode), while latency
histograms, generated tokens and speculative acceptance come from the decode engines (they answer the
client) and prompt tokens from the prefill engines (they compute them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

PREFIX = "fleetserve"
ENGINE_PREFIXES = ("sglang:", "vllm:")


@dataclass
class EngineScrape:
    """One engine process's /metrics text and its role (unified | prefill | decode)."""

    name: str
    role: str
    text: str


@dataclass
class Translated:
    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    tokens_per_second: float = 0.0
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    spec_accept_rate: float | None = None
    spec_accept_length: float | None = None
    histograms: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> {le: count, _sum, _count}
    found: bool = False  # any engine series seen at all


_GAUGES = {
    "running": ("sglang:num_running_reqs", "vllm:num_requests_running"),
    "waiting": ("sglang:num_queue_reqs", "vllm:num_requests_waiting"),
}
_USAGE = ("sglang:token_usage", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_HISTOGRAMS = {
    "time_to_first_token_seconds": ("sglang:time_to_first_token_seconds", "vllm:time_to_first_token_seconds"),
    "inter_token_latency_seconds": ("sglang:inter_token_latency_seconds", "vllm:inter_token_latency_seconds",
                                    "vllm:time_per_output_token_seconds"),
    "e2e_request_latency_seconds": ("sglang:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds"),
}
_CLIENT_ROLES = ("unified", "decode")  # engines that answer the client
_PROMPT_ROLES = ("unified", "prefill")


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name -> [(labels, value)] for engine-prefixed series only."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except Exception:  # noqa: BLE001 -- an unreadable scrape counts as no data, never an error page
        return out
    for fam in families:
        for s in fam.samples:
            if s.name.startswith(ENGINE_PREFIXES):
                out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def _sum(samples, names: Iterable[str]) -> float | None:
    vals = [v for n in names for _, v in samples.get(n, []) if not math.isnan(v)]
    return sum(vals) if vals else None


def translate(scrapes: Iterable[EngineScrape], spec_num_steps: int | None = None) -> Translated:
    t = Translated()
    usage: list[float] = []
    hit_rates: list[float] = []
    prefix_hits = prefix_queries = 0.0
    accept_rates: list[float] = []
    accept_lengths: list[float] = []
    spec_accepted = spec_drafted = 0.0
    for scrape in scrapes:
        s = _samples(scrape.text)
        if not s:
            continue
        t.found = True
        for attr, names in _GAUGES.items():
            v = _sum(s, names)
            if v is not None:
                setattr(t, attr, getattr(t, attr) + v)
        for n in _USAGE:
            usage += [v for _, v in s.get(n, [])]
        hit_rates += [v for _, v in s.get("sglang:cache_hit_rate", [])]
        prefix_hits += _sum(s, ["vllm:prefix_cache_hits_total"]) or 0.0
        prefix_queries += _sum(s, ["vllm:prefix_cache_queries_total"]) or 0.0
        t.tokens_per_second += _sum(s, ["sglang:gen_throughput"]) or 0.0
        if scrape.role in _PROMPT_ROLES:
            t.prompt_tokens += _sum(s, ["sglang:prompt_tokens_total", "vllm:prompt_tokens_total"]) or 0.0
        if scrape.role not in _CLIENT_ROLES:
            continue
        t.generation_tokens += _sum(s, ["sglang:generation_tokens_total", "vllm:generation_tokens_total"]) or 0.0
        accept_rates += [v for _, v in s.get("sglang:spec_accept_rate", [])]
        accept_lengths += [v for _, v in s.get("sglang:spec_accept_length", [])]
        spec_accepted += _sum(s, ["vllm:spec_decode_num_accepted_tokens_total"]) or 0.0
        spec_drafted += _sum(s, ["vllm:spec_decode_num_draft_tokens_total"]) or 0.0
        for ours, theirs in _HISTOGRAMS.items():
            for src in theirs:
                buckets = s.get(src + "_bucket")
                if not buckets:
                    continue
                h = t.histograms.setdefault(ours, {})
                for labels, v in buckets:
                    le = labels.get("le", "+Inf")
                    h[le] = h.get(le, 0.0) + v
                h["_sum"] = h.get("_sum", 0.0) + (_sum(s, [src + "_sum"]) or 0.0)
                h["_count"] = h.get("_count", 0.0) + (_sum(s, [src + "_count"]) or 0.0)
                break  # one source per engine (vLLM exposes both ITL names in some versions)
    t.kv_cache_usage = max(usage) if usage else 0.0
    if hit_rates:
        t.prefix_cache_hit_rate = sum(hit_rates) / len(hit_rates)
    elif prefix_queries:
        t.prefix_cache_hit_rate = prefix_hits / prefix_queries
    if accept_lengths:
        t.spec_accept_length = sum(accept_lengths) / len(accept_lengths)
    if accept_rates:
        t.spec_accept_rate = sum(accept_rates) / len(accept_rates)
    elif spec_drafted:
        t.spec_accept_rate = spec_accepted / spec_drafted
    elif t.spec_accept_length is not None and spec_num_steps:
        # accept length counts the bonus token the target model always adds
        t.spec_accept_rate = max(0.0, min(1.0, (t.spec_accept_length - 1.0) / spec_num_steps))
    return t


def _fmt(v: float) -> str:
    return repr(float(v)) if not math.isinf(v) else ("+Inf" if v > 0 else "-Inf")


def render_translated(t: Translated) -> str:
    """fleetserve_* exposition text for the translated values (nothing when no engine series were seen)."""
    if not t.found:
        return ""
    lines: list[str] = []

    def gauge(name: str, doc: str, value: float, typ: str = "gauge") -> None:
        full = f"{PREFIX}_{name}" + ("_total" if typ == "counter" else "")  # as prometheus_client writes it
        lines.extend([f"# HELP {full} {doc}", f"# TYPE {full} {typ}", f"{full} {_fmt(value)}"])

    gauge("num_requests_running", "Requests the engine(s) are computing now (from the engine's metrics).", t.running)
    gauge("num_requests_waiting", "Requests the engine(s) hold but have not admitted yet.", t.waiting)
    gauge("queue_depth", "Requests the engine(s) hold, running plus waiting: the worker's load.", t.running + t.waiting)
    gauge("kv_cache_usage", "Fraction of the KV cache in use, 0 to 1 (the fullest engine).", t.kv_cache_usage)
    gauge("prefix_cache_hit_rate", "Fraction of prompt tokens served from the prefix cache, 0 to 1.",
          t.prefix_cache_hit_rate)
    gauge("tokens_per_second", "Generated tokens per second, as the engine(s) report it.", t.tokens_per_second)
    gauge("prompt_tokens", "Prompt tokens the engine(s) processed.", t.prompt_tokens, "counter")
    gauge("generation_tokens", "Tokens the engine(s) generated.", t.generation_tokens, "counter")
    if t.spec_accept_rate is not None:
        gauge("spec_accept_rate", "Speculative decoding: fraction of draft tokens accepted, 0 to 1.", t.spec_accept_rate)
    if t.spec_accept_length is not None:
        gauge("spec_accept_length", "Speculative decoding: tokens accepted per verification step (incl. the bonus).",
              t.spec_accept_length)
    docs = {"time_to_first_token_seconds": "Time to first token.",
            "inter_token_latency_seconds": "Time between generated tokens.",
            "e2e_request_latency_seconds": "Request latency from arrival to the last token."}
    for name, h in t.histograms.items():
        full = f"{PREFIX}_{name}"
        lines += [f"# HELP {full} {docs[name]} (from the engine's histogram)", f"# TYPE {full} histogram"]
        les = sorted((k for k in h if not k.startswith("_")), key=lambda k: math.inf if k == "+Inf" else float(k))
        for le in les:
            lines.append(f'{full}_bucket{{le="{le}"}} {_fmt(h[le])}')
        lines.append(f"{full}_count {_fmt(h.get('_count', 0.0))}")
        lines.append(f"{full}_sum {_fmt(h.get('_sum', 0.0))}")
    return "\n".join(lines) + "\n"


def passthrough(scrapes: list[EngineScrape]) -> str:
    """The engines' own `sglang:*` / `vllm:*` families, unchanged for one engine; with several, every
    sample gets a `process` label and each family's HELP/TYPE appears once."""
    engine_scrapes = [s for s in scrapes if s.text]
    if len(engine_scrapes) == 1:
        return "\n".join(_engine_blocks(engine_scrapes[0].text)) + "\n" if _engine_blocks(engine_scrapes[0].text) \
            else ""
    families: dict[str, tuple[str, str, list[str]]] = {}
    for scrape in engine_scrapes:
        try:
            fams = list(text_string_to_metric_families(scrape.text))
        except Exception:  # noqa: BLE001
            continue
        for fam in fams:
            if not fam.name.startswith(ENGINE_PREFIXES):
                continue
            entry = families.setdefault(fam.name, (fam.documentation, fam.type, []))
            for s in fam.samples:
                labels = {**s.labels, "process": scrape.name}
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                entry[2].append(f"{s.name}{{{text}}} {_fmt(s.value)}")
    lines = []
    for name, (doc, typ, samples) in families.items():
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {typ}", *samples]
    return "\n".join(lines) + "\n" if lines else ""


def _engine_blocks(text: str) -> list[str]:
    """Lines of `text` that belong to engine-prefixed families (comments included), in order."""
    out = []
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            name = line.split()[2]
            if name.startswith(ENGINE_PREFIXES):
                out.append(line)
        elif line and not line.startswith("#") and line.startswith(ENGINE_PREFIXES):
            out.append(line)
    return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def drop_families(text: str, names: Mapping[str, object] | Iterable[str]) -> str:
    """Remove whole families (HELP, TYPE and samples) named in `names` from an exposition text."""
    names = set(names)
    out, skip = [], False
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            name = line.split()[2]
            skip = name in names or name.removesuffix("_total") in names
        elif line and not line.startswith("#"):
            base = line.split("{", 1)[0].split(" ", 1)[0]
            skip = any(base == n or base.startswith(n + "_") and base[len(n) + 1:] in
                       ("total", "bucket", "sum", "count", "created") for n in names)
        if not skip:
            out.append(line)
    return "\n".join(out) + ("\n" if out else "")
