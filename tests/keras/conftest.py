"""Fixtures for the Keras / TensorFlow tests.

These tests import TensorFlow and must never import torch: run them in their own process
(``pytest tests/keras``, a separate tox env). Models are tiny, data is synthetic and seeded,
fits are 2-3 epochs, so the whole folder stays within a minute or two on 2 CPU cores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple

# Before TensorFlow is imported anywhere: no C++ info logs, no oneDNN banner.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from tests.helpers.keras_models import make_images  # noqa: E402


@pytest.fixture
def data() -> Tuple[np.ndarray, np.ndarray]:
    """48 RGB images of 24 x 40 (non-square on purpose) with labels 0..2."""
    return make_images(48)


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real MLflow sqlite store in ``tmp_path`` (artifacts and the spool there too)."""
    import mlflow

    monkeypatch.chdir(tmp_path)  # the default artifact root ./mlruns lands in tmp_path
    monkeypatch.setenv("MLFLOW_EIGENCAM_SPOOL_DIR", str(tmp_path / "spool"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)
