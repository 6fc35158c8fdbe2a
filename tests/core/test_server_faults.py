"""A real `mlflow server` that dies mid-training: training goes on, nothing is lost."""

from __future__ import annotations

import time
import warnings

import pytest
from mlflow.tracking import MlflowClient

from mlflow_eigencam import EigenCAMLogger, EigenCAMWarning
from mlflow_eigencam.cli import main as cli_main
from tests.helpers.oracle import blob_batch
from tests.helpers.readback import image_series, list_all, load_json, metric_steps


def _new_run(uri: str) -> str:
    client = MlflowClient(uri)
    exp = client.create_experiment(f"faults-{time.time_ns()}")
    return client.create_run(exp).info.run_id


def _epoch(logger, epoch):
    for b in range(2):
        images, acts, labels, logits = blob_batch(seed=b)
        logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id="val")
    start = time.perf_counter()
    logger.on_epoch_end(epoch)
    return time.perf_counter() - start


def test_server_down_after_epoch_1_of_4_loses_nothing(mlflow_server, tmp_path):
    uri = mlflow_server.uri
    rid = _new_run(uri)
    logger = EigenCAMLogger(n_samples=3, run_id=rid, tracking_uri=uri, close_timeout=120)
    _epoch(logger, 0)
    assert logger.flush(timeout=60)
    mlflow_server.stop()
    durations = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in (1, 2, 3):
            durations.append(_epoch(logger, epoch))
            time.sleep(0.5)  # let the worker notice the server is gone
    assert max(durations) < 1.0, durations
    down = [w for w in caught if issubclass(w.category, EigenCAMWarning)]
    assert len(down) == 1 and str(logger.spool_dir) in str(down[0].message)
    assert len(list(logger.spool_dir.iterdir())) > 0  # kept on disk meanwhile

    mlflow_server.start()  # same store, same port
    left = logger.close()
    assert left == 0
    client = MlflowClient(uri)
    series = image_series(client, rid)
    assert sorted(series) == [f"eigencam/eval/val/sample_{i}" for i in range(3)]
    assert all(sorted(s) == [0, 1, 2, 3] for s in series.values())
    table = load_json(client, rid, "eigencam/eval/val/samples.json")
    assert [r[0] for r in table["data"]] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert [s for s, _ in metric_steps(client, rid, "eigencam/eval/val/evr_1")] == [0, 1, 2, 3]
    grids = [f for f in list_all(client, rid, "eigencam") if f.endswith("grid.png")]
    assert len(grids) == 4


def test_leftover_spool_is_sent_later_by_the_command(mlflow_server):
    uri = mlflow_server.uri
    rid = _new_run(uri)
    logger = EigenCAMLogger(n_samples=2, run_id=rid, tracking_uri=uri)
    mlflow_server.stop()
    _epoch(logger, 0)
    with pytest.warns(EigenCAMWarning, match="send-spool"):
        left = logger.close(timeout=1.0)
    assert left > 0
    spool = logger.spool_dir
    assert spool.is_dir()

    mlflow_server.start()
    assert cli_main(["send-spool", str(spool), "--tracking-uri", uri]) == 0
    assert not spool.exists()  # sent, then our own folder removed (nothing else was in it)
    series = image_series(MlflowClient(uri), rid)
    assert sorted(series) == ["eigencam/eval/val/sample_0", "eigencam/eval/val/sample_1"]
