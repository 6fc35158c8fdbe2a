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
