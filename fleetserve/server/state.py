"""What a worker process holds: its config, the resolved model, and (once loaded) engine + tokenizer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from fleetserve.config import ServeConfig
from fleetserve.models import ModelFiles


@dataclass
class WorkerState:
    config: ServeConfig
    model_files: ModelFiles
    served_model_name: str
    engine: object | None = None  # the Engine protocol (fleetserve.engine.types.Engine)
    tokenizer: object | None = None
    device: str = "cpu"
    load_error: str | None = None
    started_at: float = field(default_factory=time.time)


def get_state(request: Request) -> WorkerState:
    return request.app.state.worker
