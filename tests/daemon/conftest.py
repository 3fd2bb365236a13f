"""Fixtures of the daemon suite: the tiny test model, written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from erllama_py.model.testmodel import write_test_model


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=0)
