"""``layers=[...]`` on the Keras callback: both layers explained at every epoch, one card row,
table columns, metrics and faithfulness per layer, the run tag naming both."""

from __future__ import annotations

import json

import keras
import mlflow
import numpy as np
import pytest

from mlflow_eigencam.keras import EigenCAMCallback
from tests.helpers.keras_models import build_cnn
from tests.helpers.oracle import textbook


def test_two_layers_are_logged_side_by_side(data, tracking_uri):
    x, y = data
    xv, yv = x[40:43], y[40:43]
    model = build_cnn()
    cb = EigenCAMCallback(validation_data=(xv, yv), layers=["conv1", "conv2"], n_components=2,
                          n_samples=3)
    with mlflow.start_run() as run:
        model.fit(x[:16], y[:16], epochs=2, batch_size=8, verbose=0, callbacks=[cb])
    client = mlflow.MlflowClient(tracking_uri)
    rid = run.info.run_id
    with open(client.download_artifacts(rid, "eigencam/eval/val/samples.json")) as f:
        table = json.load(f)
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert [r["epoch"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert rows[0]["card"]["titles"] == ["input", "conv1 PC1", "conv1 PC2", "conv2 PC1", "conv2 PC2"]
    # The last epoch's ratios: the per-sample SVD of each layer of the trained model.
    for name, prefix in (("conv1", ""), ("conv2", "conv2/")):
        acts = keras.Model(model.inputs[0], model.get_layer(name).output)(xv, training=False)
        _, ratios, _ = textbook(np.moveaxis(keras.ops.convert_to_numpy(acts), -1, 1), 2)
        got = [[r[f"{prefix}evr_1"], r[f"{prefix}evr_2"]] for r in rows[3:]]
        np.testing.assert_allclose(got, ratios, atol=1e-4)
    assert all(r["conv2/faithfulness"] is not None and r["faithfulness"] is not None for r in rows)
    metrics = client.get_run(rid).data.metrics
    for key in ("evr_1", "conv2/evr_1", "conv2/evr_2", "conv2/map_change", "conv2/faithfulness"):
        assert f"eigencam/eval/val/{key}" in metrics
    assert client.get_run(rid).data.tags["mlflow_eigencam.target_layer"] == "conv1, conv2"


def test_layer_and_layers_together_are_refused():
    with pytest.raises(ValueError, match="layer='conv2' and layers=\\['conv1'\\]"):
        EigenCAMCallback(layer="conv2", layers=["conv1"])
    with pytest.raises(TypeError, match="layers must be"):
        EigenCAMCallback(layers="conv1")
