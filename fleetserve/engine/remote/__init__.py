"""Remote engines: SGLang or vLLM processes launched from a plan (`fleetserve.planner`), reached over HTTP.

`launcher` starts, watches and stops the processes; `proxy` forwards HTTP to them untouched;
`metrics_translate` turns their Prometheus series into fleetserve's. The worker app that puts these
together is `fleetserve.server.remote_app`.
"""
