"""Logging set-up: JSON lines for machines, readable lines for people, secrets never written.

Redaction is a filter on every handler fleetserve installs (filters on loggers do not see records
propagated from child loggers), and the JSON formatter redacts its final line as a second guard.
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.handlers
import os
import re
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REDACTED = "***"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "warn": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}

# Set by the server's request middleware; added to every record logged while handling that request.
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("fleetserve_request_id", default=None)

_PATTERNS = (
    (re.compile(r"hf_[A-Za-z0-9]{20,}"), REDACTED),
    (re.compile(r"(?i)\b(Bearer)\s+[A-Za-z0-9\-._~+/]+=*"), r"\1 " + REDACTED),
)
_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_MIN_SECRET_LEN = 4  # shorter values would redact ordinary words

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime"}


def register_secret(value: str | None) -> None:
    """Redact this exact value from every log line from now on (tokens, API keys)."""
    if value and len(value) >= _MIN_SECRET_LEN:
        with _secrets_lock:
            _secrets.add(value)


def redact(text: str) -> str:
    """Replace registered secrets and token-shaped strings with "***"."""
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites a record's message, args, string extras and traceback with secrets removed."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError, KeyError):  # a bad format string: keep the raw parts
            message = f"{record.msg} {record.args}"
        clean = redact(str(message))
        if clean != message or not isinstance(record.msg, str):
            record.msg, record.args = clean, None
        for key, value in list(vars(record).items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                setattr(record, key, redact(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if getattr(record, "request_id", None) is None and (rid := request_id_var.get()) is not None:
            record.request_id = rid
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        return redact(json.dumps(entry, default=str, ensure_ascii=False))


class _PlainFormatter(logging.Formatter):
    """Human format for a non-rich TTY; extras appended as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line


def parse_level(level: str | int) -> int:
    """A level name in any case (or a logging int) -> logging int; ValueError names what is allowed."""
    if isinstance(level, int):
        return level
    try:
        return LEVELS[str(level).strip().lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; allowed: debug, info, warning, error") from None


LOG_FILE_MAX_BYTES = 64 << 20  # rotate the log file at 64 MiB, keeping LOG_FILE_BACKUPS old ones
LOG_FILE_BACKUPS = 3


def open_log_file(log_file: Path) -> tuple[logging.Handler | None, str | None]:
    """A rotating JSON-lines file handler, or (None, why not): a log file must never stop the server."""
    try:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=LOG_FILE_MAX_BYTES,
                                                       backupCount=LOG_FILE_BACKUPS, encoding="utf-8")
    except OSError as exc:
        return None, f"cannot write the log file {log_file}: {exc.strerror or exc}"
    handler.setFormatter(JsonFormatter())
    return handler, None


def setup_logging(level: str, json_logs: bool | None = None, log_file: Path | None = None) -> str | None:
    """Configure the root logger; JSON when stderr is not a TTY (or json_logs=True). Idempotent.

    With `log_file`, lines also go (as JSON) to that file. If it cannot be opened, logging goes on
    without it: the problem is logged (to stderr) and returned, for /health to report; else None.
    """
    numeric_level = parse_level(level)
    for noisy in ("httpx", "httpcore"):  # one line per health probe would drown everything else
        logging.getLogger(noisy).setLevel(max(numeric_level, logging.WARNING))
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_fleetserve", False):
            root.removeHandler(handler)
            handler.close()
    stream = sys.stderr
    is_tty = bool(getattr(stream, "isatty", lambda: False)())
    use_json = (not is_tty) if json_logs is None else json_logs

    handler: logging.Handler
    if use_json:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter())
    else:
        try:
            from rich.console import Console
            from rich.logging import RichHandler

            handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False, markup=False)
        except ImportError:  # rich is a dependency, but logging must never be what breaks
            handler = logging.StreamHandler(stream)
            handler.setFormatter(_PlainFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handlers = [handler]
    file_error = None
    if log_file is not None:
        file_handler, file_error = open_log_file(log_file)
        if file_handler is not None:
            handlers.append(file_handler)
    for h in handlers:
        h.addFilter(RedactingFilter())
        h._fleetserve = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(numeric_level)
    if file_error:
        logging.getLogger("fleetserve").error("%s; logging to stderr only", file_error)
    return file_error


def tail_lines(path: Path, n: int, block_size: int = 64 << 10) -> list[str]:
    """The last `n` lines of a text file, read backwards in blocks (never the whole file)."""
    if n <= 0:
        return []
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        pos = f.tell()
        data = b""
        while pos > 0 and data.count(b"\n") <= n:
            step = min(block_size, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    lines = data.decode("utf-8", errors="replace").splitlines()
    if pos > 0:  # the first line may be a partial one: there are more than n lines, so drop it
        lines = lines[1:]
    return lines[-n:]
