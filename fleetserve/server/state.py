"""What a worker process holds: its config, the resolved model, and (once loaded) engine + tokenizer."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request

from fleetserve.config import ServeConfig
from fleetserve.models import ModelFiles
from fleetserve.server.metrics import InstrumentedEngine, WorkerMetrics


@dataclass
class WorkerState:
    config: ServeConfig
    model_files: ModelFiles
    served_model_name: str
    # The Engine protocol (fleetserve.engine.types.Engine). Whatever is assigned here is wrapped in an
    # InstrumentedEngine (see __setattr__), so every request through `state.engine` is timed and counted.
    engine: Any | None = None
    tokenizer: Any | None = None
    device: str = "cpu"
    load_error: str | None = None
    started_at: float = field(default_factory=time.time)
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    log_file: Path | None = None  # the file /logs reads (None: no file logging)
    log_file_error: str | None = None  # why the log file could not be opened, for /health
    draining: bool = False  # set on SIGTERM/SIGINT: /readyz 503, new inference requests 503
    in_flight: int = 0  # HTTP requests being handled (streams until their last byte); health probes excluded
    request_tasks: set[asyncio.Task] = field(default_factory=set)  # their tasks, cancelled if a drain times out

    def __post_init__(self) -> None:
        self.metrics.bind_engine(lambda: self.engine)
        self.metrics.in_flight = lambda: self.in_flight
        self.metrics.draining = lambda: self.draining
        self.metrics.set_info(model=self.served_model_name, backend="native")
        if self.engine is not None:
            self.engine = self.engine  # wrap an engine given to the constructor

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "engine" and value is not None and not isinstance(value, InstrumentedEngine) \
                and "metrics" in self.__dict__:
            value = InstrumentedEngine(value, self.metrics)
        super().__setattr__(name, value)

    @property
    def raw_engine(self) -> Any | None:
        """The engine without the metrics wrapper."""
        engine = self.engine
        return engine.inner if isinstance(engine, InstrumentedEngine) else engine


def get_state(request: Request) -> WorkerState:
    return request.app.state.worker
