"""What the control plane needs from a place that runs replicas (local processes, Hathora rooms,
Kubernetes pods): start, observe, probe, stop, and read logs. Nothing else: scaling, replacement and
rolling updates are the reconciler's job, the same for every provider."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx

from fleetserve.control.spec import DeploymentSpec
from fleetserve.control.store import ReplicaRow


@dataclass
class Liveness:
    alive: bool
    exit_code: int | None = None
    reason: str = ""  # why it is gone (the worker's last error line, the platform's status message)


class Provider(Protocol):
    name: str

    async def start(self, spec: DeploymentSpec, replica_id: str, generation: int) -> ReplicaRow: ...

    async def observe(self, r: ReplicaRow) -> Liveness: ...

    async def ready(self, r: ReplicaRow, client: httpx.AsyncClient) -> bool: ...

    async def stop(self, r: ReplicaRow, force: bool = False) -> None:
        """force=False: ask it to drain and exit; force=True: end it now. Idempotent."""

    async def release(self, r: ReplicaRow) -> None:
        """Forget local handles of a replica that is gone."""

    async def logs(self, r: ReplicaRow, tail: int) -> list[str]: ...

    def log_file(self, r: ReplicaRow) -> Path | None:
        """A local file that grows with the replica's log (for follow), if there is one."""
