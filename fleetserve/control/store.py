"""Desired and observed state in one SQLite file: deployments, their replicas, and events.

The reconciler and the API share it; every write is one short transaction under a lock, so a
control plane killed at any point restarts from a consistent picture.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fleetserve.control.secrets import SecretBox
from fleetserve.control.spec import DeploymentSpec

SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
  name TEXT PRIMARY KEY, spec TEXT NOT NULL, token BLOB, generation INTEGER NOT NULL DEFAULT 1,
  status TEXT NOT NULL, message TEXT NOT NULL DEFAULT '', deleting INTEGER NOT NULL DEFAULT 0,
  created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS replicas (
  id TEXT PRIMARY KEY, deployment TEXT NOT NULL, generation INTEGER NOT NULL, port INTEGER, pid INTEGER,
  url TEXT, status TEXT NOT NULL, started_at REAL, log_path TEXT, internal_key BLOB);
CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY AUTOINCREMENT, deployment TEXT NOT NULL, ts REAL NOT NULL, reason TEXT NOT NULL,
  message TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_deployment ON events (deployment, id);
"""


@dataclass
class DeploymentRow:
    name: str
    spec: DeploymentSpec  # with hf_token decrypted (never leaves the control plane)
    generation: int
    status: str
    message: str
    deleting: bool
    created_at: float
    updated_at: float


@dataclass
class ReplicaRow:
    id: str
    deployment: str
    generation: int
    port: int | None
    pid: int | None
    url: str | None
    status: str  # starting | ready | draining | failed | stopped
    started_at: float | None
    log_path: str | None


class Store:
    def __init__(self, path: Path, secrets: SecretBox):
        self.path, self.secrets = path, secrets
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def _exec(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ---- deployments ----

    def create(self, spec: DeploymentSpec) -> bool:
        """False if the name is taken."""
        now = time.time()
        token = self.secrets.seal(spec.hf_token.get_secret_value()) if spec.hf_token else None
        body = spec.model_dump_json(exclude={"hf_token"})
        try:
            self._exec("INSERT INTO deployments (name, spec, token, status, message, created_at, updated_at) "
                       "VALUES (?, ?, ?, 'pending', 'waiting for the reconciler', ?, ?)",
                       (spec.name, body, token, now, now))
        except sqlite3.IntegrityError:
            return False
        return True

    def _row(self, r: tuple) -> DeploymentRow:
        name, spec, token, generation, status, message, deleting, created, updated = r
        data = json.loads(spec)
        if token is not None:
            data["hf_token"] = self.secrets.open(token)
        return DeploymentRow(name, DeploymentSpec.model_validate(data), generation, status, message,
                             bool(deleting), created, updated)

    _COLS = "name, spec, token, generation, status, message, deleting, created_at, updated_at"

    def get(self, name: str) -> DeploymentRow | None:
        rows = self._exec(f"SELECT {self._COLS} FROM deployments WHERE name = ?", (name,))
        return self._row(rows[0]) if rows else None

    def list(self) -> list[DeploymentRow]:
        return [self._row(r) for r in self._exec(f"SELECT {self._COLS} FROM deployments ORDER BY created_at")]

    def update_spec(self, spec: DeploymentSpec, bump_generation: bool) -> None:
        self._exec("UPDATE deployments SET spec = ?, generation = generation + ?, updated_at = ? WHERE name = ?",
                   (spec.model_dump_json(exclude={"hf_token"}), 1 if bump_generation else 0, time.time(), spec.name))

    def set_status(self, name: str, status: str, message: str) -> bool:
        """True if it changed."""
        rows = self._exec("SELECT status, message FROM deployments WHERE name = ?", (name,))
        if not rows or rows[0] == (status, message):
            return False
        self._exec("UPDATE deployments SET status = ?, message = ?, updated_at = ? WHERE name = ?",
                   (status, message, time.time(), name))
        return True

    def mark_deleting(self, name: str) -> None:
        self._exec("UPDATE deployments SET deleting = 1, status = 'deleting', message = 'stopping replicas', "
                   "updated_at = ? WHERE name = ?", (time.time(), name))

    def remove(self, name: str) -> None:
        self._exec("DELETE FROM deployments WHERE name = ?", (name,))
        self._exec("DELETE FROM replicas WHERE deployment = ?", (name,))
        self._exec("DELETE FROM events WHERE deployment = ?", (name,))

    # ---- replicas ----

    def put_replica(self, r: ReplicaRow) -> None:
        self._exec("INSERT OR REPLACE INTO replicas (id, deployment, generation, port, pid, url, status, started_at, "
                   "log_path) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (r.id, r.deployment, r.generation, r.port, r.pid, r.url, r.status, r.started_at, r.log_path))

    def replicas(self, deployment: str) -> list[ReplicaRow]:
        rows = self._exec("SELECT id, deployment, generation, port, pid, url, status, started_at, log_path "
                          "FROM replicas WHERE deployment = ? ORDER BY id", (deployment,))
        return [ReplicaRow(*r) for r in rows]

    def delete_replica(self, replica_id: str) -> None:
        self._exec("DELETE FROM replicas WHERE id = ?", (replica_id,))

    # ---- events ----

    def event(self, deployment: str, reason: str, message: str) -> None:
        self._exec("INSERT INTO events (deployment, ts, reason, message) VALUES (?, ?, ?, ?)",
                   (deployment, time.time(), reason, message))

    def events(self, deployment: str, limit: int = 100) -> list[dict]:
        rows = self._exec("SELECT ts, reason, message FROM events WHERE deployment = ? ORDER BY id DESC LIMIT ?",
                          (deployment, limit))
        return [{"ts": ts, "reason": reason, "message": msg} for ts, reason, msg in reversed(rows)]
