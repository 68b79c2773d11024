"""Helpers for in-process tests of the worker app: the real app on the shared engine, an httpx client
on its ASGI interface, Prometheus text parsing, and file logging set up (and undone) per test."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from fleetserve import logs
from fleetserve.config import ServeConfig
from fleetserve.models import resolve_model
from fleetserve.server.app import create_app, new_state
from fleetserve.server.state import WorkerState

STORY = "Once upon a time"


def make_app(engine, tokenizer, log_file: Path | None = None, **cfg):
    """(app, state) for `ServeConfig(**cfg)` on the given (shared) engine; nothing is loaded."""
    state = new_state(ServeConfig(**cfg), resolve_model("default", download=False))
    state.engine, state.tokenizer = engine, tokenizer
    state.log_file = log_file
    return create_app(state, load=False), state


def client(app, **kwargs) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://worker", timeout=60, **kwargs)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def families(text: str) -> dict[str, str]:
    """Prometheus text -> {family name: type}."""
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


@contextmanager
def file_logging(path: Path, level: str = "info") -> Iterator[Path]:
    """fleetserve's logging (JSON to stderr + `path`) for the duration; the previous set-up restored."""
    root = logging.getLogger()
    before, old_level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}  # the test client's own
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    error = logs.setup_logging(level, json_logs=True, log_file=path)
    assert error is None, error
    try:
        yield path
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()
        for handler in [h for h in before if h not in root.handlers]:
            root.addHandler(handler)
        root.setLevel(old_level)
        for name, lvl in quiet.items():
            logging.getLogger(name).setLevel(lvl)


def state_of(app) -> WorkerState:
    return app.state.worker
