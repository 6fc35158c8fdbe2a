"""integrations/keras.py: the faithfulness pass of EigenCAMCallback (docs/signals.md) in real
fits: scores in the table and a mean metric per epoch, the user's losses unchanged."""

from __future__ import annotations

import json

import keras
import mlflow
import pytest

from mlflow_eigencam.keras import EigenCAMCallback
from tests.helpers.keras_models import build_cnn


def _fit(data, faithfulness, with_callback=True):
    x, y = data
    keras.utils.set_random_seed(0)
    model = build_cnn(dropout=True)
    callbacks = [EigenCAMCallback(validation_data=(x[40:44], y[40:44]), n_samples=4,
                                  faithfulness=faithfulness)] if with_callback else []
    with mlflow.start_run() as run:
        history = model.fit(x[:32], y[:32], epochs=2, batch_size=8, verbose=0, shuffle=False,
                            callbacks=callbacks)
    return run.info.run_id, history.history["loss"], model.get_weights()


def test_faithfulness_is_logged_and_changes_no_loss(data, tracking_uri):
    plain = _fit(data, True, with_callback=False)
    off = _fit(data, False)
    on = _fit(data, True)
    assert plain[1] == off[1] == on[1]
    assert all((a == b).all() for a, b in zip(plain[2], on[2]))
    client = mlflow.MlflowClient(tracking_uri)
    with open(client.download_artifacts(on[0], "eigencam/eval/val/samples.json")) as f:
        table = json.load(f)
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert len(rows) == 8 and all(-1 <= r["faithfulness"] <= 1 for r in rows)
    history = client.get_metric_history(on[0], "eigencam/eval/val/faithfulness")
    assert sorted(m.step for m in history) == [0, 1]
    assert not client.get_metric_history(off[0], "eigencam/eval/val/faithfulness")
    with open(client.download_artifacts(off[0], "eigencam/eval/val/samples.json")) as f:
        assert "faithfulness" not in json.load(f)["columns"]


def test_bad_fractions_fail_at_construction():
    with pytest.raises(ValueError, match=r"fractions must be numbers in \(0, 1\), got \[1\]"):
        EigenCAMCallback(faithfulness=[1])
