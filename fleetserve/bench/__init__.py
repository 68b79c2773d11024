"""`fleetserve bench`: a serving benchmark for any OpenAI-compatible endpoint (or the native engine offline).

One role per module:

* ``datasets``  workloads (random with exact token lengths, ShareGPT, prompts JSONL, shared-prefix)
* ``arrival``   request arrival times (Poisson / gamma with burstiness, seeded)
* ``client``    httpx async streaming client: SSE parsing, per-chunk timestamps, error types
* ``offline``   the same request records from the native engine in-process (no HTTP)
* ``metrics``   pure functions: request records -> summary (TTFT, TPOT, ITL, E2E, throughput, goodput)
* ``report``    rich tables, the versioned JSON document, matplotlib plots
* ``runner``    orchestration: warm-up, levels (sweeps), A/B comparison in alternating rounds
* ``cli``       the typer command registered as ``fleetserve bench``

The results JSON schema is documented in ``docs/bench.md``.
"""

SCHEMA_VERSION = 1
