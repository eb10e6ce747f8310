"""Fixtures shared by every test tier."""

from pathlib import Path

import pytest

from engine.weights import DEFAULT_MODEL_ID, resolve_model_dir


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct converted to a local model dir (fetched and converted once)."""
    return resolve_model_dir(DEFAULT_MODEL_ID)
