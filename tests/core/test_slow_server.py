"""A real `mlflow server` behind a proxy that delays every response (``/health`` too) by 2 s:
the sender takes it for slow, not down, and every epoch arrives."""

from __future__ import annotations

import logging
import time
import warnings

import mlflow
from mlflow.tracking import MlflowClient

from mlflow_eigencam import EigenCAMLogger, EigenCAMWarning
from mlflow_eigencam.sink import State
from tests.helpers.proxy import DelayProxy
from tests.helpers.readback import image_series, load_json, metric_steps
from tests.helpers.spool import feed_epoch


def test_a_server_answering_in_2_s_is_slow_not_down_and_gets_every_epoch(mlflow_server, caplog):
    """Before: the fixed 2 s ``/health`` timeout took this server for down, forever (0 of
    the epochs arrived); its files went one request after the other."""
    client = MlflowClient(mlflow_server.uri)
    rid = client.create_run(client.create_experiment(f"slow-{time.time_ns()}")).info.run_id
    proxy = DelayProxy(mlflow_server.port, delay=2.0)
    try:
        logger = EigenCAMLogger(n_samples=2, run_id=rid, tracking_uri=proxy.uri)
        states = set()
        with warnings.catch_warnings(record=True) as caught, \
                caplog.at_level(logging.WARNING, logger="mlflow_eigencam"):
            warnings.simplefilter("always")
            for epoch in range(3):
                feed_epoch(logger, epoch)
                states.add(logger._sink._state)
            left = logger.close(timeout=150)
            states.add(logger._sink._state)
        concurrent = proxy.max_concurrent
    finally:
        proxy.stop()
    said = [str(w.message) for w in caught if issubclass(w.category, EigenCAMWarning)]
    assert left == 0, (left.message(), said)
    assert not [m for m in said if "cannot reach" in m], said
    # This logger's server only: a sender thread an earlier test left waiting on its own dead
    # server may log into this test's capture.
    assert not [r for r in caplog.records if "cannot reach MLflow" in r.getMessage()
                and proxy.uri.rstrip("/") in r.getMessage()], caplog.text
    assert State.DOWN not in states and State.SLOW in states, states
    assert "answers slowly" in caplog.text
    assert concurrent > 2  # an epoch's files went up together
    # MLflow 2.x's client resolves mlflow-artifacts: against the global tracking URI.
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server.uri)
    try:
        series = image_series(client, rid)
        table = load_json(client, rid, "eigencam/eval/val/samples.json")
    finally:
        mlflow.set_tracking_uri(before)
    assert sorted(series) == ["eigencam/eval/val/sample_0", "eigencam/eval/val/sample_1"]
    assert all(sorted(s) == [0, 1, 2] for s in series.values())
    assert sorted(r[0] for r in table["data"]) == [0, 0, 1, 1, 2, 2]
    assert [s for s, _ in metric_steps(client, rid, "eigencam/eval/val/evr_1")] == [0, 1, 2]
