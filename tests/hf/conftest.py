"""Fixtures of the Hugging Face Trainer tests: tiny models from configs, shapes data, offline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from tests.helpers.torch_seed import _seeded  # noqa: E402,F401  (autouse, after the skip)


@pytest.fixture(autouse=True)
def _autolog_off():
    yield
    import mlflow_eigencam

    mlflow_eigencam.autolog(disable=True)
