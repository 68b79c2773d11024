"""`fleetserve up` (the platform) and the deployment commands that talk to its API:
`deploy`, `status`, `logs`, `scale`, `delete`. Every command has `--output json` for scripts."""

from __future__ import annotations

import json
import os
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err = Console(stderr=True)

URL_OPT = Annotated[str, typer.Option("--url", envvar="FLEETSERVE_URL",
                                      help="The platform's address (from `fleetserve up`).")]
KEY_OPT = Annotated[str | None, typer.Option("--api-key", envvar="FLEETSERVE_API_KEY",
                                             help="Admin key of the platform, if it has one.")]
OUT_OPT = Annotated[str, typer.Option("--output", "-o", help="table | json")]
DEFAULT_URL = "http://127.0.0.1:8080"


def up(
    host: Annotated[str, typer.Option(help="Address to bind (loopback unless you need more).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the console, the API and the gateway.")] = 8080,
    api_key: Annotated[list[str] | None, typer.Option(
        "--api-key", help="Admin key required on /api/v1 and /v1 (repeatable). Env: FLEETSERVE_API_KEY.")] = None,
    no_default_deployment: Annotated[bool, typer.Option(
        "--no-default-deployment", help="Do not create the `default` deployment of the embedded model.")] = False,
    keep_replicas: Annotated[bool, typer.Option(
        "--keep-replicas", help="Leave replicas running when `up` exits (re-adopted by the next `up`).")] = False,
) -> None:
    """Run the platform: control API under /api/v1, the OpenAI gateway under /v1, one process.

    State lives in FLEETSERVE_HOME (default ~/.fleetserve): a SQLite database, replica logs and the
    model cache. Deployments survive restarts: replicas still running are re-adopted, missing ones
    started again. By default a deployment named `default` serves the embedded SmolLM2-135M model.
    """
    import asyncio

    import uvicorn

    from fleetserve.control.platform import Platform, create_platform_app
    from fleetserve.logs import register_secret, setup_logging
    from fleetserve.models import fleetserve_home

    keys = list(api_key or []) or [k for k in os.environ.get("FLEETSERVE_API_KEY", "").split(",") if k]
    for k in keys:
        register_secret(k)
    setup_logging("info")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown}:{port}"
    p = Platform(fleetserve_home(), base, keys, default_deployment=not no_default_deployment)
    app = create_platform_app(p)
    if keep_replicas:
        app.state.keep_replicas = True
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    auth = " -H 'Authorization: Bearer $FLEETSERVE_API_KEY'" if keys else ""
    console.print(f"[bold green]fleetserve[/] platform on {base}")
    console.print(f"  Console: {base}/")
    console.print(f"  API:     {base}/api/v1/deployments   (docs: {base}/docs)", soft_wrap=True)
    console.print(f"  OpenAI:  {base}/v1")
    if not no_default_deployment:
        console.print(f"  try:     curl {base}/v1/chat/completions{auth} -H 'Content-Type: application/json' "
                      "-d '{\"model\": \"default\", \"messages\": [{\"role\": \"user\", \"content\": "
                      "\"What is the capital of France?\"}], \"temperature\": 0}'", soft_wrap=True, highlight=False,
                      markup=False)
    asyncio.run(server.serve())


def _client(url: str, api_key: str | None):
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30.0)


def _call(method: str, url: str, api_key: str | None, path: str, **kw):
    import httpx

    try:
        with _client(url, api_key) as c:
            resp = c.request(method, path, **kw)
    except httpx.HTTPError as exc:
        err.print(f"[bold red]error:[/] cannot reach the platform at {url}: {exc}. Is `fleetserve up` running?")
        raise typer.Exit(1) from exc
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail", resp.json())
        except ValueError:
            detail = resp.text
        if isinstance(detail, list):
            detail = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', [])[1:])}: {e.get('msg')}" for e in detail)
        err.print(f"[bold red]error ({resp.status_code}):[/] {detail}")
        raise typer.Exit(1)
    return resp.json()


def _age(ts: float) -> str:
    s = int(time.time() - ts)
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def _table(deps: list[dict]) -> Table:
    t = Table()
    for col in ("name", "model", "status", "ready", "endpoint", "age", "message"):
        t.add_column(col)
    colors = {"running": "green", "failed": "red", "starting": "yellow", "pending": "yellow"}
    for d in deps:
        st = d["status"]
        t.add_row(d["name"], d["spec"]["model"], f"[{colors.get(st, 'cyan')}]{st}[/]",
                  f"{d['ready_replicas']}/{d['desired_replicas']}", d["endpoint"], _age(d["created_at"]),
                  d["message"])
    return t


def _emit(data, output: str, render) -> None:
    if output == "json":
        typer.echo(json.dumps(data, indent=2))
    else:
        console.print(render(data))


def deploy(
    model: Annotated[str, typer.Argument(help="'default', a Hub id (org/name) or a local path.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Deployment name (DNS label); clients pass it as `model`.")],
    replicas: Annotated[int | None, typer.Option(help="Fixed replica count (min = max = N).")] = None,
    min_replicas: Annotated[int | None, typer.Option("--min", help="Minimum replicas.")] = None,
    max_replicas: Annotated[int | None, typer.Option("--max", help="Maximum replicas.")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub branch, tag or commit.")] = None,
    backend: Annotated[str | None, typer.Option(
        help="native | sglang | vllm. sglang/vllm: provider local, one replica on this machine's NVIDIA GPUs, "
             "a Hub model. \\[default: native]")] = None,
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "auto",
    max_model_len: Annotated[int | None, typer.Option(help="Context window per request.")] = None,
    hf_token: Annotated[str | None, typer.Option(envvar="HF_TOKEN", show_envvar=False,
                                                 help="HF token for gated models (stored encrypted; env HF_TOKEN).")] = None,
    provider: Annotated[str, typer.Option(
        help="Where replicas run: local | hathora | kubernetes; modal (with --dry-run) prints a Modal app.")] = "local",
    region: Annotated[str | None, typer.Option(help="Hathora region (provider hathora), e.g. Seattle.")] = None,
    image: Annotated[str | None, typer.Option(help="Container image (cloud providers); default: fleetserve's.")] = None,
    cpu: Annotated[float | None, typer.Option(help="CPU cores per replica (cloud providers).")] = None,
    memory_mb: Annotated[int | None, typer.Option(help="Memory per replica in MB (cloud providers).")] = None,
    gpus: Annotated[int | None, typer.Option(help="GPUs per replica (cloud providers).")] = None,
    gpu_type: Annotated[str | None, typer.Option(help="GPU model, e.g. H100 (with --gpus).")] = None,
    namespace: Annotated[str | None, typer.Option(help="Kubernetes namespace (provider kubernetes).")] = None,
    autoscaler: Annotated[str | None, typer.Option(
        help="Kubernetes autoscaler in the --dry-run manifests: none | hpa | keda.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print instead of deploying (no cluster or platform needed): Kubernetes manifests "
                          "(-o yaml or json; secrets are ${HF_TOKEN} / ${FLEETSERVE_API_KEY} placeholders) or, "
                          "with --provider modal, a Modal app for `modal deploy`.")] = False,
    engine_arg: Annotated[list[str] | None, typer.Option(
        "--engine-arg", "-e", help="KEY=VALUE passed to every replica's engine, repeatable: max_batch_tokens, "
        "max_running_seqs, kv_cache_tokens, block_size, max_queue_len, tp_size, quantization=fp8, "
        "kv_cache_dtype=fp8_e4m3|fp8_e5m2, attention_backend, speculative=ngram|eagle, speculative_num_steps, "
        "speculative_draft_model_path (sglang/vllm: kv_cache_tokens, max_queue_len).")] = None,
    wait: Annotated[bool, typer.Option(help="Wait until the deployment is running.")] = False,
    url: URL_OPT = DEFAULT_URL, api_key: KEY_OPT = None,
    output: Annotated[str, typer.Option("--output", "-o", help="table | json; yaml with --dry-run")] = "table",
) -> None:
    """Create a deployment: the platform starts its replicas and routes /v1 requests with `model` = NAME."""
    lo = replicas if replicas is not None else (min_replicas if min_replicas is not None else 1)
    hi = replicas if replicas is not None else (max_replicas if max_replicas is not None else max(lo, 1))
    spec = {"name": name, "model": model, "revision": revision, "precision": precision, "device": device,
            "max_model_len": max_model_len, "replicas": {"min": lo, "max": hi}, "provider": provider}
    if backend is not None:
        spec["backend"] = backend
    for key, value in (("region", region), ("image", image), ("cpu", cpu), ("memory_mb", memory_mb)):
        if value is not None:  # unset cloud fields stay out: the local provider rejects them
            spec[key] = value
    if gpus is not None or gpu_type is not None:
        spec["gpu"] = {k: v for k, v in (("count", gpus), ("type", gpu_type)) if v is not None}
    k8s = {k: v for k, v in (("namespace", namespace), ("autoscaler", autoscaler)) if v is not None}
    if k8s:
        spec["kubernetes"] = k8s
    if engine_arg:
        spec["engine_args"] = _engine_args(engine_arg)
    if dry_run:
        _dry_run(spec, output)
        return
    if provider == "modal":
        err.print("[bold red]error:[/] Modal apps are generated, not run by the platform: add --dry-run and "
                  "deploy the printed file with `modal deploy`")
        raise typer.Exit(2)
    if autoscaler not in (None, "none"):
        err.print("[bold red]error:[/] --autoscaler is for --dry-run manifests; on the platform fleetserve's own "
                  "autoscaler scales replicas between --min and --max")
        raise typer.Exit(2)
    if hf_token:
        spec["hf_token"] = hf_token
    d = _call("POST", url, api_key, "/api/v1/deployments", json=spec)
    if wait:
        d = _wait_running(url, api_key, name)
    _emit(d, output, lambda x: _table([x]))


def _engine_args(pairs: list[str]) -> dict[str, int | str]:
    """KEY=VALUE strings -> engine_args (integers as integers; the API validates names and values)."""
    out: dict[str, int | str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            err.print(f"[bold red]error:[/] --engine-arg {pair!r}: expected KEY=VALUE, e.g. speculative=ngram")
            raise typer.Exit(2)
        value = value.strip()
        out[key.strip().replace("-", "_")] = int(value) if value.isdigit() else value
    return out


def _dry_run(spec: dict, output: str) -> None:
    """Kubernetes manifests for the spec, printed, nothing deployed (the HF token is never printed)."""
    from pydantic import ValidationError

    from fleetserve.control.providers.kubernetes import manifests, to_yaml
    from fleetserve.control.spec import DeploymentSpec

    if spec["provider"] not in ("kubernetes", "modal"):
        err.print("[bold red]error:[/] --dry-run prints Kubernetes manifests or a Modal app: use it with "
                  "--provider kubernetes or --provider modal")
        raise typer.Exit(2)
    try:
        if spec["provider"] == "modal":
            from fleetserve.control.providers.modal_app import ModalOptions, render_app

            fields = {k: v for k, v in spec.items() if k not in ("provider", "device") and v is not None}
            opts = ModalOptions.model_validate(fields)
        else:
            parsed = DeploymentSpec.model_validate(spec)
    except ValidationError as exc:
        for e in exc.errors():
            err.print(f"[bold red]error:[/] {'.'.join(str(x) for x in e['loc']) or 'spec'}: {e['msg']}")
        raise typer.Exit(2) from None
    if spec["provider"] == "modal":
        typer.echo(render_app(opts), nl=False)
        err.print(f"create the secret first: modal secret create {opts.secret_name} HF_TOKEN=... "
                  "FLEETSERVE_API_KEY=...  (each optional)", highlight=False, markup=False, soft_wrap=True)
        return
    objects = manifests(parsed)
    if output == "json":
        typer.echo(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2))
    else:
        typer.echo(to_yaml(objects), nl=False)


def _wait_running(url: str, api_key: str | None, name: str, timeout: float = 900) -> dict:
    deadline = time.time() + timeout
    with console.status(f"waiting for {name} to be running..."):
        while time.time() < deadline:
            d = _call("GET", url, api_key, f"/api/v1/deployments/{name}")
            if d["status"] == "running":
                return d
            if d["status"] == "failed":
                err.print(f"[bold red]{name} failed:[/] {d['message']}")
                raise typer.Exit(1)
            time.sleep(1)
    err.print(f"[bold red]timed out[/] waiting for {name}")
    raise typer.Exit(1)


def status(
    name: Annotated[str | None, typer.Argument(help="One deployment; all when omitted.")] = None,
    url: URL_OPT = DEFAULT_URL, api_key: KEY_OPT = None, output: OUT_OPT = "table",
) -> None:
    """Show deployments: status, ready/desired replicas, endpoint; with NAME also its replicas and events."""
    if name is None:
        _emit(_call("GET", url, api_key, "/api/v1/deployments"), output, _table)
        return
    d = _call("GET", url, api_key, f"/api/v1/deployments/{name}")
    if output == "json":
        d["events"] = _call("GET", url, api_key, f"/api/v1/deployments/{name}/events", params={"limit": 20})["events"]
        typer.echo(json.dumps(d, indent=2))
        return
    console.print(_table([d]))
    reps = Table(title="replicas")
    for col in ("id", "status", "url", "pid", "age"):
        reps.add_column(col)
    for r in d["replicas"]:
        reps.add_row(r["id"], r["status"], r["url"] or "", str(r["pid"] or ""), _age(r["started_at"] or time.time()))
    console.print(reps)
    ev = Table(title="recent events")
    for col in ("age", "reason", "message"):
        ev.add_column(col)
    for e in _call("GET", url, api_key, f"/api/v1/deployments/{name}/events", params={"limit": 10})["events"]:
        ev.add_row(_age(e["ts"]), e["reason"], e["message"])
    console.print(ev)


def logs(
    name: Annotated[str, typer.Argument(help="Deployment name.")],
    tail: Annotated[int, typer.Option(help="Lines per replica.")] = 100,
    replica: Annotated[str | None, typer.Option(help="Only this replica id.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming new lines.")] = False,
    url: URL_OPT = DEFAULT_URL, api_key: KEY_OPT = None,
) -> None:
    """Print a deployment's replica logs (prefixed by replica id); -f follows them."""
    params = {"tail": tail, **({"replica": replica} if replica else {})}
    if not follow:
        for item in _call("GET", url, api_key, f"/api/v1/deployments/{name}/logs", params=params)["lines"]:
            typer.echo(f"[{item['replica']}] {item['line']}")
        return
    with _client(url, api_key) as c, c.stream("GET", f"/api/v1/deployments/{name}/logs",
                                              params={**params, "follow": "true"}, timeout=None) as resp:
        for line in resp.iter_lines():
            typer.echo(line)


def scale(
    name: Annotated[str, typer.Argument(help="Deployment name.")],
    min_replicas: Annotated[int | None, typer.Option("--min", help="Minimum replicas.")] = None,
    max_replicas: Annotated[int | None, typer.Option("--max", help="Maximum replicas.")] = None,
    replicas: Annotated[int | None, typer.Option(help="Fixed count (min = max = N).")] = None,
    url: URL_OPT = DEFAULT_URL, api_key: KEY_OPT = None, output: OUT_OPT = "table",
) -> None:
    """Change a deployment's replica bounds; the platform starts or drains replicas to match."""
    lo = replicas if replicas is not None else min_replicas
    hi = replicas if replicas is not None else max_replicas
    if lo is None and hi is None:
        err.print("[bold red]error:[/] give --replicas N, or --min and/or --max")
        raise typer.Exit(2)
    body = {"replicas": {k: v for k, v in (("min", lo), ("max", hi)) if v is not None}}
    _emit(_call("PATCH", url, api_key, f"/api/v1/deployments/{name}", json=body), output, lambda x: _table([x]))


def delete(
    name: Annotated[str, typer.Argument(help="Deployment name.")],
    url: URL_OPT = DEFAULT_URL, api_key: KEY_OPT = None,
) -> None:
    """Delete a deployment: its replicas drain and stop, then it is gone."""
    _call("DELETE", url, api_key, f"/api/v1/deployments/{name}")
    console.print(f"deleting [bold]{name}[/]: replicas drain, then stop")


def register(app: typer.Typer) -> None:
    for fn in (up, deploy, status, logs, scale, delete):
        app.command(fn.__name__)(fn)
