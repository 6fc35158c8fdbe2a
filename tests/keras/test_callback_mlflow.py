"""EigenCAMCallback end to end: real fits logging into a real MLflow sqlite store, read back."""

from __future__ import annotations

import json

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf

from mlflow_eigencam.keras import EigenCAMCallback
from mlflow_eigencam.sink import EigenCAMWarning
from tests.helpers.keras_models import (
    artifact_paths,
    build_cnn,
    build_sequential,
    find_panel,
    logged_images,
    make_images,
    read_png,
    upscaled,
)

NAMES = ["circle", "square", "triangle"]


def test_rgb_non_square_images_metrics_grid_and_tags(data, tracking_uri):
    x, y = data
    xv, yv = x[40:44], y[40:44]
    model = build_cnn()
    cb = EigenCAMCallback(validation_data=(xv, yv), n_samples=4, label_mapping=NAMES)
    with mlflow.start_run() as run:
        model.fit(x[:40], y[:40], epochs=3, batch_size=8, verbose=0, callbacks=[cb])
    run_id = run.info.run_id

    images = logged_images(tracking_uri, run_id)
    assert sorted(images) == [f"eigencam/eval/all/sample_{i}" for i in range(4)]
    for i in range(4):
        steps = images[f"eigencam/eval/all/sample_{i}"]
        assert sorted(steps) == [0, 1, 2]
        # 24 x 40 is upscaled by 6 to 144 x 240 (height x width, not swapped), pixel for pixel.
        panel = upscaled(xv[i], 6)
        assert panel.shape == (144, 240, 3)
        where = [find_panel(steps[s], panel) for s in (0, 1, 2)]
        assert where[0] is not None and where[0][1] < 16, f"sample {i}: input panel not found"
        assert where[0] == where[1] == where[2]  # pinned: the same image every epoch
        strip = steps[0]
        assert strip.shape[1] > strip.shape[0]  # a 2 x 2 card of wide panels
        # PC1 sits right of the input panel, as wide as it; PC2 and PC3 under them.
        assert 2 * 240 <= strip.shape[1] < 3 * 240 and strip.shape[0] > 2 * 144

    files = artifact_paths(tracking_uri, run_id, "eigencam")
    for epoch in range(3):
        grid = read_png(tracking_uri, run_id, f"eigencam/eval/all/epoch_{epoch:04d}/grid.png")
        # the four cards side by side in one row (4 per row), under the header
        assert grid.ndim == 3 and grid.shape[1] >= 4 * 2 * 240 and grid.shape[0] > 2 * 144
        assert f"eigencam/eval/all/epoch_{epoch:04d}/sample_3.png" in files
    local = mlflow.MlflowClient(tracking_uri).download_artifacts(run_id, "eigencam/eval/all/samples.json")
    with open(local) as f:
        table = json.load(f)
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert len(rows) == 12 and {r["epoch"] for r in rows} == {0, 1, 2}
    assert {r["label"] for r in rows} <= set(NAMES)
    assert [r["label"] for r in rows[:4]] == [NAMES[v] for v in yv]

    client = mlflow.MlflowClient(tracking_uri)
    history = {c: client.get_metric_history(run_id, f"eigencam/eval/all/evr_{c}") for c in (1, 2, 3)}
    for points in history.values():
        assert sorted(p.step for p in points) == [0, 1, 2]
        assert all(0.0 < p.value <= 1.0 for p in points)
    for step in range(3):
        v = [next(p.value for p in history[c] if p.step == step) for c in (1, 2, 3)]
        assert v[0] >= v[1] >= v[2] and sum(v) <= 1.0 + 1e-6
    tags = client.get_run(run_id).data.tags
    assert tags["mlflow_eigencam.target_layer"] == "conv2"
    assert mlflow.active_run() is None


def test_grayscale_sequential_with_a_dataset(tracking_uri):
    x, y = make_images(24, channels=1)
    ds = tf.data.Dataset.from_tensor_slices((x[16:], y[16:])).batch(3)
    model = build_sequential()  # no Input: built by fit
    cb = EigenCAMCallback(validation_data=ds, n_samples=3, n_components=2)
    with mlflow.start_run() as run:
        model.fit(x[:16], y[:16], epochs=2, verbose=0, validation_data=ds, callbacks=[cb])
    images = logged_images(tracking_uri, run.info.run_id)
    assert sorted(images) == [f"eigencam/eval/all/sample_{i}" for i in range(3)]
    for i in range(3):
        strip = images[f"eigencam/eval/all/sample_{i}"][1]
        top, left = find_panel(strip, upscaled(x[16 + i, :, :, 0], 6))
        panel = strip[top:top + 144, left:left + 240]
        assert np.array_equal(panel[..., 0], panel[..., 1]) and np.array_equal(panel[..., 1], panel[..., 2])
    tags = mlflow.MlflowClient(tracking_uri).get_run(run.info.run_id).data.tags
    assert tags["mlflow_eigencam.target_layer"] == "sconv2"


class Corrupt(keras.callbacks.Callback):
    """After epoch 0, swap the pinned images for ones with 5 channels (the model takes 3)."""

    def __init__(self, target: EigenCAMCallback) -> None:
        super().__init__()
        self.target = target

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            pinned = self.target._sources()[("eval", None)]
            pinned.x = np.zeros(pinned.x.shape[:3] + (5,), np.float32)


def test_a_failure_at_run_time_warns_and_fit_completes(data, tracking_uri):
    x, y = data
    model = build_cnn()
    cb = EigenCAMCallback(validation_data=(x[40:42], y[40:42]), n_samples=2)
    with mlflow.start_run() as run:
        with pytest.warns(EigenCAMWarning, match=r"epoch 1 \(eval, ds_id=None\) failed"):
            history = model.fit(x[:16], y[:16], epochs=3, verbose=0, callbacks=[cb, Corrupt(cb)])
    assert len(history.history["loss"]) == 3
    images = logged_images(tracking_uri, run.info.run_id)
    assert {k: sorted(v) for k, v in images.items()} == {
        "eigencam/eval/all/sample_0": [0], "eigencam/eval/all/sample_1": [0]}


def test_train_samples_every_other_epoch_and_a_run_of_its_own(data, tracking_uri):
    x, y = data
    model = build_cnn()
    cb = EigenCAMCallback(validation_data=(x[40:], y[40:]), train_data=(x, y), n_samples=2,
                          mode=None, log_every_n_epochs=2)
    assert mlflow.active_run() is None
    model.fit(x[:16], y[:16], epochs=3, verbose=0, callbacks=[cb])
    assert mlflow.active_run() is None  # the run the logger started is ended at train end
    runs = mlflow.search_runs(output_format="list")
    assert len(runs) == 1 and runs[0].info.run_id == cb.logger.run_id
    images = logged_images(tracking_uri, cb.logger.run_id)
    assert {k: sorted(v) for k, v in images.items()} == {
        f"eigencam/{m}/all/sample_{i}": [0, 2] for m in ("train", "eval") for i in range(2)}
    strip = images["eigencam/train/all/sample_1"][2]
    assert find_panel(strip, upscaled(x[1], 6)) is not None


class Pairs(keras.utils.PyDataset):
    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x) // 2

    def __getitem__(self, i):
        return self.x[2 * i:2 * i + 2], self.y[2 * i:2 * i + 2]


def test_several_datasets_pydataset_and_all_samples(data, tracking_uri):
    x, y = data
    model = build_cnn()
    cb = EigenCAMCallback(validation_data={"numpy": (x[40:43], y[40:43]), "pyds": Pairs(x[:6], y[:6])},
                          n_samples=None, n_components=1)
    with mlflow.start_run() as run:
        model.fit(x[:16], y[:16], epochs=2, verbose=0, callbacks=[cb])
    images = logged_images(tracking_uri, run.info.run_id)
    expected = {f"eigencam/eval/numpy/sample_{i}" for i in range(3)}
    expected |= {f"eigencam/eval/pyds/sample_{i}" for i in range(6)}
    assert set(images) == expected
    assert all(sorted(v) == [0, 1] for v in images.values())
    top_left = find_panel(images["eigencam/eval/pyds/sample_5"][1], upscaled(x[5], 6))
    assert top_left is not None


def test_fit_data_from_autolog_and_a_second_fit(data, tracking_uri):
    """What autolog does: hand fit's arguments over before fit runs; the callback is reusable."""
    x, y = data
    model = build_cnn()
    cb = EigenCAMCallback(n_samples=2)
    with mlflow.start_run() as run:
        cb._set_fit_data(x=x[:32], y=y[:32], validation_split=0.25)
        model.fit(x[:32], y[:32], epochs=1, verbose=0, validation_split=0.25, callbacks=[cb])
        cb._set_fit_data(x=x[:32], y=y[:32], validation_data=(x[44:], y[44:]))
        model.fit(x[:32], y[:32], epochs=2, initial_epoch=1, verbose=0,
                  validation_data=(x[44:], y[44:]), callbacks=[cb])
    images = logged_images(tracking_uri, run.info.run_id)
    assert sorted(images["eigencam/eval/all/sample_0"]) == [0, 1]
    # Epoch 0 explained the last quarter of x (fit's validation split), epoch 1 x[44:].
    assert find_panel(images["eigencam/eval/all/sample_0"][0], upscaled(x[24], 6)) is not None
    assert find_panel(images["eigencam/eval/all/sample_0"][1], upscaled(x[44], 6)) is not None
