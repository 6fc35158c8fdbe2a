"""Fixtures shared by every test group: a real MLflow store, a real MLflow server."""

from __future__ import annotations

import pytest

from tests.helpers.readback import MlflowServer


@pytest.fixture(autouse=True)
def _isolated_spool(tmp_path, monkeypatch):
    """Keep spools inside the test's tmp dir."""
    monkeypatch.setenv("MLFLOW_EIGENCAM_SPOOL_DIR", str(tmp_path / "spool"))


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch):
    """A real sqlite MLflow store in tmp_path, set as the tracking URI (and reset after)."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    artifacts = (tmp_path / "artifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("eigencam-tests", artifact_location=artifacts)
    mlflow.set_experiment(experiment_id=exp)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, local served artifacts)."""
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        yield server
    finally:
        server.stop()
