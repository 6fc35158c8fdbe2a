"""The sender (sink.py): early encoding, its state, what close() reports."""

from __future__ import annotations

import time

import numpy as np

from mlflow_eigencam._records import Encoded
from mlflow_eigencam.sink import MlflowSink, State


def test_encode_soon_encodes_on_the_worker_before_the_item_is_submitted(tmp_path):
    sink = MlflowSink(tmp_path / "sp")
    images = [Encoded(np.full((4, 4, 3), i, np.uint8)) for i in range(3)]
    sink.encode_soon(*images)
    deadline = time.monotonic() + 10
    while any(im._data is None for im in images) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(im._data is not None for im in images)
    assert sink.close(timeout=5) == 0
    assert sink._state is State.OK


def test_items_of_a_run_deleted_mid_training_are_counted_not_delivered(tracking_uri):
    """MLflow rejects items of a deleted run: they are set aside, and close() says so
    (it returned 0, "everything was delivered", before)."""
    import mlflow
    import pytest
    from mlflow.tracking import MlflowClient

    from mlflow_eigencam import EigenCAMLogger, EigenCAMWarning
    from tests.helpers.spool import feed_epoch

    with mlflow.start_run() as run:
        pass
    rid = run.info.run_id
    logger = EigenCAMLogger(n_samples=2, run_id=rid)
    feed_epoch(logger, 0)
    assert logger.flush(60)
    MlflowClient().delete_run(rid)
    with pytest.warns(EigenCAMWarning, match="NOT delivered"):
        feed_epoch(logger, 1)
        feed_epoch(logger, 2)
        left = logger.close(timeout=60)
    assert left == 2 and len(left.set_aside) == 2 and left.records == []
    assert all(p.is_file() and p.parent.name == "failed" for p in left.set_aside)
    assert "2 item(s) were NOT delivered" in left.message()


def test_the_log_after_a_403_says_how_long_uploads_were_refused(tracking_uri, caplog):
    """It printed the machine's uptime (time since 0 on the monotonic clock) before."""
    import logging
    import re

    import mlflow
    import pytest

    from mlflow_eigencam import EigenCAMWarning
    from mlflow_eigencam._records import Item
    from mlflow_eigencam._transport import Failure, SendError

    with mlflow.start_run() as run:
        pass
    sink = MlflowSink(run_id=run.info.run_id, tracking_uri=tracking_uri)
    with pytest.warns(EigenCAMWarning, match="credentials"):
        sink._mark_down(SendError(Failure.REFUSED, "403 PERMISSION_DENIED"))  # what a 403 does
        sink._warn_pending(stacklevel=1)
    time.sleep(0.3)
    with caplog.at_level(logging.WARNING, logger="mlflow_eigencam"):
        sink.submit(Item("tags", run.info.run_id, tracking_uri,
                         tags={"mlflow_eigencam.version": "x"}))
        assert sink.close(timeout=60) == 0
    said = [r.getMessage() for r in caplog.records if "again after" in r.getMessage()]
    assert said and "accepts uploads again" in said[0], said
    seconds = float(re.search(r"after ([0-9.]+) s", said[0]).group(1))
    assert 0.3 <= seconds < 60, said
