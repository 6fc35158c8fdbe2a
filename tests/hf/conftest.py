"""Fixtures of the Hugging Face Trainer tests: tiny models from configs, shapes data, offline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same torch random state, on few threads (2-core CI)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _autolog_off():
    yield
    import mlflow_eigencam

    mlflow_eigencam.autolog(disable=True)
