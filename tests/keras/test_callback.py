"""integrations/keras.py, the EigenCAMCallback: real fits logging into a real MLflow sqlite
store, read back (images, table rows, metrics, tags); the target layer of every kind of Keras
model, read through the public ``activations()``; samples from fit's data and the callback's own.
"""

from __future__ import annotations

import json
import warnings

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf

import mlflow_eigencam
from mlflow_eigencam.errors import EigenCAMWarning
from mlflow_eigencam.keras import EigenCAMCallback, Samples
from tests.helpers.keras_models import (
    artifact_paths,
    build_cnn,
    build_nested,
    build_sequential,
    find_panel,
    logged_images,
    make_images,
    read_png,
    upscaled,
)
from tests.helpers.readback import free_port

NAMES = ["circle", "square", "triangle"]


# --------------------------------------------------------------------------- fits, read back


def test_rgb_non_square_images_metrics_grid_and_tags(data, tracking_uri):
    x, y = data
    xv, yv = x[40:44], y[40:44]
    model = build_cnn()
    cb = EigenCAMCallback(validation_data=(xv, yv), n_samples=4, label_mapping=NAMES)
    with mlflow.start_run() as run:
        model.fit(x[:40], y[:40], epochs=3, batch_size=8, verbose=0, callbacks=[cb])
    run_id = run.info.run_id

    images = logged_images(tracking_uri, run_id)
    assert sorted(images) == [f"eigencam/eval/val/sample_{i}" for i in range(4)]
    for i in range(4):
        steps = images[f"eigencam/eval/val/sample_{i}"]
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
        grid = read_png(tracking_uri, run_id, f"eigencam/eval/val/epoch_{epoch:04d}/grid.png")
        # the four cards side by side in one row (4 per row), under the header
        assert grid.ndim == 3 and grid.shape[1] >= 4 * 2 * 240 and grid.shape[0] > 2 * 144
        assert f"eigencam/eval/val/epoch_{epoch:04d}/sample_3.png" in files
    local = mlflow.MlflowClient(tracking_uri).download_artifacts(run_id, "eigencam/eval/val/samples.json")
    with open(local) as f:
        table = json.load(f)
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert len(rows) == 12 and {r["epoch"] for r in rows} == {0, 1, 2}
    assert {r["label"] for r in rows} <= set(NAMES)
    assert [r["label"] for r in rows[:4]] == [NAMES[v] for v in yv]

    client = mlflow.MlflowClient(tracking_uri)
    history = {c: client.get_metric_history(run_id, f"eigencam/eval/val/evr_{c}") for c in (1, 2, 3)}
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
    assert sorted(images) == [f"eigencam/eval/val/sample_{i}" for i in range(3)]
    for i in range(3):
        strip = images[f"eigencam/eval/val/sample_{i}"][1]
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
            pinned = self.target.samples[("eval", "val")]
            pinned.x = np.zeros(pinned.x.shape[:3] + (5,), np.float32)


def test_a_failure_at_run_time_warns_and_fit_completes(data, tracking_uri):
    x, y = data
    model = build_cnn()
    cb = EigenCAMCallback(validation_data=(x[40:42], y[40:42]), n_samples=2)
    with mlflow.start_run() as run:
        with pytest.warns(EigenCAMWarning, match=r"epoch 1 \(eval, ds_id='val'\) failed"):
            history = model.fit(x[:16], y[:16], epochs=3, verbose=0, callbacks=[cb, Corrupt(cb)])
    assert len(history.history["loss"]) == 3
    images = logged_images(tracking_uri, run.info.run_id)
    assert {k: sorted(v) for k, v in images.items()} == {
        "eigencam/eval/val/sample_0": [0], "eigencam/eval/val/sample_1": [0]}


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
        f"eigencam/{m}/{d}/sample_{i}": [0, 2] for m, d in (("train", "train"), ("eval", "val")) for i in range(2)}
    strip = images["eigencam/train/train/sample_1"][2]
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
        cb.use_fit_data(x=x[:32], y=y[:32], validation_split=0.25)
        model.fit(x[:32], y[:32], epochs=1, verbose=0, validation_split=0.25, callbacks=[cb])
        cb.use_fit_data(x=x[:32], y=y[:32], validation_data=(x[44:], y[44:]))
        model.fit(x[:32], y[:32], epochs=2, initial_epoch=1, verbose=0,
                  validation_data=(x[44:], y[44:]), callbacks=[cb])
    images = logged_images(tracking_uri, run.info.run_id)
    assert sorted(images["eigencam/eval/val/sample_0"]) == [0, 1]
    # Epoch 0 explained the last quarter of x (fit's validation split), epoch 1 x[44:].
    assert find_panel(images["eigencam/eval/val/sample_0"][0], upscaled(x[24], 6)) is not None
    assert find_panel(images["eigencam/eval/val/sample_0"][1], upscaled(x[44], 6)) is not None


def test_a_second_fit_from_epoch_0_continues_the_steps(data, tracking_uri):
    """Two-phase fine-tuning: the second fit counts from epoch 0 again; its images and metric
    points land after the first fit's, never two at one step."""
    x, y = data
    model = build_cnn()
    cb = EigenCAMCallback(validation_data=(x[40:], y[40:]), n_samples=2)
    with mlflow.start_run() as run:
        model.fit(x[:32], y[:32], epochs=2, verbose=0, callbacks=[cb])
        model.fit(x[:32], y[:32], epochs=2, verbose=0, callbacks=[cb])
    images = logged_images(tracking_uri, run.info.run_id)
    assert sorted(images["eigencam/eval/val/sample_0"]) == [0, 1, 2, 3]
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "eigencam/eval/val/evr_1")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]


def test_validation_and_training_data_use_the_dataset_ids_of_every_integration(data, tracking_uri, tmp_path):
    """validation_data -> ds_id "val", train_data -> "train" (as Lightning logs them), so the
    README's ``compare --ds-id val`` reads a Keras run; the run's tag and ``samples`` agree."""
    x, y = data
    cb = EigenCAMCallback(validation_data=(x[40:42], y[40:42]), train_data=(x, y), n_samples=2,
                          mode=None)
    assert set(cb.samples) == {("eval", "val"), ("train", "train")}
    assert all(isinstance(s, Samples) for s in cb.samples.values())
    with mlflow.start_run() as run:
        build_cnn().fit(x[:16], y[:16], epochs=1, verbose=0, callbacks=[cb])
    rid = run.info.run_id
    assert set(logged_images(tracking_uri, rid)) == {
        f"eigencam/{m}/{d}/sample_{i}" for m, d in (("eval", "val"), ("train", "train")) for i in range(2)}
    assert "eigencam/eval/val/evr_1" in mlflow.MlflowClient(tracking_uri).get_run(rid).data.metrics
    result = mlflow_eigencam.compare([rid], mode="eval", ds_id="val", out=tmp_path / "c.png",
                                     tracking_uri=tracking_uri)
    assert (tmp_path / "c.png").stat().st_size > 0, result
    with pytest.raises(LookupError, match="val"):  # no data without an id: the error lists 'val'
        mlflow_eigencam.compare([rid], mode="eval", ds_id=None, out=tmp_path / "d.png",
                                tracking_uri=tracking_uri)


def test_close_returns_what_was_not_delivered(data, tracking_uri):
    """Every public close() returns the logger's count: 0 once all arrived, 0 when closed twice."""
    x, y = data
    cb = EigenCAMCallback(validation_data=(x[40:42], y[40:42]), n_samples=2)
    model = build_cnn()
    cb.set_model(model)
    with mlflow.start_run() as run:
        cb.on_train_begin()
        cb.on_epoch_end(0)
        left = cb.close()
        assert isinstance(left, int) and left == 0
        assert cb.close() == 0
    assert sorted(logged_images(tracking_uri, run.info.run_id)) == ["eigencam/eval/val/sample_0",
                                                                   "eigencam/eval/val/sample_1"]
    # A later fit reopens the logger; fit's own on_train_end closes it again.
    with mlflow.start_run():
        model.fit(x[:8], y[:8], epochs=1, verbose=0, callbacks=[cb])
    assert cb.close() == 0


def test_close_counts_what_the_server_did_not_take(data, tmp_path):
    """With the server down, close() returns the logger's Undelivered (the epoch's records)."""
    x, y = data
    cb = EigenCAMCallback(validation_data=(x[40:42], y[40:42]), n_samples=2, spool_dir=tmp_path,
                          run_id="b" * 32, tracking_uri=f"http://127.0.0.1:{free_port()}")
    cb.set_model(build_cnn())
    cb.on_train_begin()
    cb.on_epoch_end(0)
    with pytest.warns(EigenCAMWarning, match="kept in"):
        left = cb.close(timeout=0.5)
    assert left == 2 and left.records
    assert cb.close() == 0


# --------------------------------------------------------------------------- the target layer


def _ready(model, x, **kwargs) -> EigenCAMCallback:
    cb = EigenCAMCallback(validation_data=(x, None), n_samples=len(x), **kwargs)
    cb.set_model(model)
    cb.activations(x[:1])  # resolves the target layer, as fit's first epoch would
    return cb


def _all_layers(model):
    """Every layer of ``model``, nested models' included."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def test_functional_default_is_the_last_spatial_layer(data):
    x, _ = data
    model = build_cnn()
    cb = _ready(model, x[:4])
    assert cb.target_layer == "conv2"
    # 40 samples: two probe batches (PROBE_BATCH_SIZE = 32), put back together in order.
    acts, preds = cb.activations(x[:40])
    reference = keras.Model(model.inputs[0], model.get_layer("conv2").output)(x[:40])
    np.testing.assert_allclose(acts, np.asarray(reference), rtol=1e-5, atol=1e-6)
    assert acts.shape == (40, 12, 20, 8)  # (B, h, w, C) of a 24 x 40 input after one pool
    np.testing.assert_allclose(preds, np.asarray(model(x[:40])), rtol=1e-5, atol=1e-6)


def test_layers_with_a_1x1_output_are_skipped(data):
    x, _ = data
    keras.utils.set_random_seed(0)
    inp = keras.Input((24, 40, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", name="wide")(inp)
    h = keras.layers.Conv2D(5, (24, 40), name="one_by_one")(h)  # (B, 1, 1, 5): no map to show
    out = keras.layers.Dense(2)(keras.layers.Flatten()(h))
    cb = _ready(keras.Model(inp, out), x[:2])
    assert cb.target_layer == "wide"


def test_sequential_built_by_fit_without_input(data):
    x, y = data
    model = build_sequential()
    model.fit(x[:8], y[:8], epochs=1, verbose=0)
    cb = _ready(model, x[:3])
    assert cb.target_layer == "sconv2"
    acts, preds = cb.activations(x[:3])
    assert acts.shape == (3, 12, 20, 6)
    np.testing.assert_allclose(preds, np.asarray(model(x[:3])), rtol=1e-5, atol=1e-6)


def test_nested_backbone_is_picked_whole_and_inner_layers_work(data):
    x, _ = data
    model = build_nested()
    backbone = model.get_layer("backbone")
    cb = _ready(model, x[:3])
    assert cb.target_layer == "backbone"
    acts, preds = cb.activations(x[:3])
    np.testing.assert_allclose(acts, np.asarray(backbone(x[:3])), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(preds, np.asarray(model(x[:3])), rtol=1e-5, atol=1e-6)

    inner = backbone.get_layer("conv_a")
    cb = _ready(model, x[:3], layer="conv_a")
    assert cb.target_layer == "backbone/conv_a"
    acts, _ = cb.activations(x[:3])
    reference = keras.Model(backbone.inputs[0], inner.output)(x[:3])
    np.testing.assert_allclose(acts, np.asarray(reference), rtol=1e-5, atol=1e-6)
    assert acts.shape == (3, 24, 40, 6)
    assert "call" not in vars(inner)  # the temporary wrapper is gone
    cb = _ready(model, x[:3], layer=inner)  # a layer object works the same way
    assert cb.target_layer == "backbone/conv_a"


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed")
        self.c1 = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="sub_c1")
        self.c2 = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="sub_c2")
        self.gap = keras.layers.GlobalAveragePooling2D()
        self.head = keras.layers.Dense(3)

    def call(self, x, training=False):
        return self.head(self.gap(self.c2(self.c1(x))))


def test_subclassed_model_is_probed_by_one_forward_pass(data):
    x, y = data
    keras.utils.set_random_seed(0)
    model = Subclassed()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:8], y[:8], epochs=1, verbose=0)
    cb = _ready(model, x[:2])
    assert cb.target_layer == "sub_c2"
    acts, _ = cb.activations(x[:2])
    assert acts.shape == (2, 12, 20, 4)
    np.testing.assert_allclose(acts, np.asarray(model.c2(model.c1(x[:2]))), rtol=1e-5, atol=1e-6)
    assert all("call" not in vars(layer) for layer in model.layers)


def test_unknown_layers_are_named_in_the_error(data):
    x, _ = data
    model = build_nested()
    cb = EigenCAMCallback(validation_data=(x[:2], None), layer="conv9")
    cb.set_model(model)
    with pytest.raises(ValueError, match=r"'conv9' is not in model 'nested'.*backbone/conv_b"):
        cb.activations(x[:2])
    stranger = keras.layers.Conv2D(2, 3, name="stranger")
    cb = EigenCAMCallback(validation_data=(x[:2], None), layer=stranger)
    cb.set_model(model)
    with pytest.raises(ValueError, match="'stranger'.*not part of model 'nested'"):
        cb.activations(x[:2])


def test_dense_only_model_says_what_to_pass(data):
    x, _ = data
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((24, 40, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    cb = EigenCAMCallback(validation_data=(x[:2], None))
    cb.set_model(model)
    with pytest.raises(ValueError, match="pass layer=<name>"):
        cb.activations(x[:2])


def test_the_model_is_left_as_it_was(data, tracking_uri):
    """Same weights after a seeded fit with and without the callback; nothing else touched."""
    x, y = data
    xv, yv = x[40:], y[40:]

    def fit(with_callback: bool):
        model = build_cnn(dropout=True, seed=1)
        layers = list(model.layers)
        trainable = [layer.trainable for layer in model.layers]
        optimizer, loss = model.optimizer, model.loss
        keras.utils.set_random_seed(7)
        callbacks = [EigenCAMCallback(validation_data=(xv, yv), n_samples=3)] if with_callback else []
        model.fit(x[:40], y[:40], epochs=2, batch_size=8, shuffle=False, verbose=0,
                  validation_data=(xv, yv), callbacks=callbacks)
        assert list(model.layers) == layers
        assert [layer.trainable for layer in model.layers] == trainable
        assert model.optimizer is optimizer and model.loss == loss and model.compiled
        assert all("call" not in vars(layer) for layer in model.layers)
        return model.get_weights(), int(model.optimizer.iterations.numpy())

    with_cb, steps_with = fit(True)
    without, steps_without = fit(False)
    assert steps_with == steps_without == 10
    assert len(with_cb) == len(without)
    for a, b in zip(with_cb, without):
        np.testing.assert_array_equal(a, b)


def test_a_missing_layer_warns_and_fit_goes_on(data, tracking_uri):
    x, y = data
    model = build_cnn()
    cb = EigenCAMCallback(validation_data=(x[:4], y[:4]), layer="nope")
    with pytest.warns(EigenCAMWarning, match="finding the target layer failed.*'nope'"):
        history = model.fit(x[:16], y[:16], epochs=2, verbose=0, callbacks=[cb])
    assert len(history.history["loss"]) == 2


def test_a_backbone_that_pools_inside_itself_is_read_before_its_pooling(data):
    """``include_top=False, pooling="avg"`` backbones nested in a model: the map they pool."""
    x, _ = data
    keras.utils.set_random_seed(0)
    inp = keras.Input((24, 40, 3))
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="bb_conv")(inp)
    h = keras.layers.Conv2D(5, 3, strides=2, padding="same", name="bb_last")(h)
    backbone = keras.Model(inp, keras.layers.GlobalAveragePooling2D(name="bb_pool")(h), name="bb")
    model = keras.Sequential([keras.Input((24, 40, 3)), backbone, keras.layers.Dense(3, name="top")])
    cb = _ready(model, x[:3])
    assert cb.target_layer == "bb/bb_pool:input"
    acts, preds = cb.activations(x[:3])
    reference = keras.Model(backbone.inputs[0], backbone.get_layer("bb_last").output)(x[:3])
    np.testing.assert_allclose(acts, np.asarray(reference), rtol=1e-5, atol=1e-6)
    assert acts.shape == (3, 12, 20, 5)
    np.testing.assert_allclose(preds, np.asarray(model(x[:3])), rtol=1e-5, atol=1e-6)
    assert all("call" not in vars(layer) for layer in _all_layers(model))
    again, _ = _ready(model, x[:3], layer=cb.target_layer).activations(x[:3])
    np.testing.assert_array_equal(again, acts)


# --------------------------------------------------------------------------- samples


def test_generators_are_refused_at_construction_and_left_untouched(data, tracking_uri):
    x, y = data

    def gen():
        for i in range(0, len(x), 8):
            yield x[i:i + 8], y[i:i + 8]

    g = gen()
    with pytest.raises(TypeError, match=r"one-shot iterator.*generator function itself \(gen, not gen\(\)\)"):
        EigenCAMCallback(validation_data=g)
    first = next(g)  # nothing was read from it
    np.testing.assert_array_equal(first[0], x[:8])
    with pytest.raises(TypeError, match="one-shot iterator"):
        EigenCAMCallback(validation_data=iter([(x, y)]))


def test_fit_data_validation_split_matches_keras(data):
    x, y = data
    cb = EigenCAMCallback(n_samples=4)
    cb.use_fit_data(x=x, y=y, validation_split=0.25)
    eval_samples = cb.samples[("eval", "val")]
    # Keras keeps the last 25 % for validation: floor(48 * 0.75) = 36.
    np.testing.assert_array_equal(eval_samples.x, x[36:40])
    np.testing.assert_array_equal(eval_samples.y, y[36:40])
    assert ("train", "train") not in cb.samples  # mode "!train"


def test_fit_data_train_samples_and_explicit_data_wins(data):
    x, y = data
    xv, yv = make_images(6, seed=3)
    cb = EigenCAMCallback(validation_data=(xv, yv), n_samples=3, mode=None)
    cb.use_fit_data(x=x, y=y, validation_data=(x[40:], y[40:]))
    sources = cb.samples
    np.testing.assert_array_equal(sources[("eval", "val")].x, xv[:3])  # the callback's own
    np.testing.assert_array_equal(sources[("train", "train")].x, x[:3])
    # A dataset given to fit as x yields (x, y) batches.
    cb2 = EigenCAMCallback(n_samples=2, mode="train")
    cb2.use_fit_data(x=tf.data.Dataset.from_tensor_slices((x, y)).batch(4))
    np.testing.assert_array_equal(cb2.samples[("train", "train")].y, y[:2])


def test_fit_data_generator_warns_and_never_raises(data):
    x, y = data

    def gen():
        yield x[:8], y[:8]

    g = gen()
    cb = EigenCAMCallback()
    with pytest.warns(EigenCAMWarning, match="one-shot iterator"):
        cb.use_fit_data(x=x, y=y, validation_data=g)
    assert cb.samples == {}
    assert next(g)[0].shape == (8, 24, 40, 3)  # not consumed


def test_train_data_with_a_mode_that_filters_it_warns(data):
    x, y = data
    with pytest.warns(EigenCAMWarning, match="train_data is not used"):
        cb = EigenCAMCallback(train_data=(x, y))
    assert cb.samples == {}


def test_several_validation_sets_by_ds_id(data):
    x, y = data
    cb = EigenCAMCallback(validation_data={"a": (x[:4], y[:4]), "b": (x[4:8], y[4:8])},
                          n_samples=2, ds_id="!b")
    assert set(cb.samples) == {("eval", "a")}


def test_bad_configuration_fails_at_construction():
    with pytest.raises(ValueError, match="n_samples"):
        EigenCAMCallback(n_samples=0)
    with pytest.raises(ValueError, match="mode"):
        EigenCAMCallback(mode="validate")
    with pytest.raises(TypeError, match="channels_last"):
        EigenCAMCallback(channels_last=False)
    with pytest.raises(TypeError, match="layer"):
        EigenCAMCallback(layer=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EigenCAMCallback()  # no data yet is fine (autolog gives it later)


def test_a_generator_function_is_called_once_and_its_generator_closed(data, tracking_uri):
    x, y = data
    calls, closed = [], []

    def gen():
        calls.append(1)
        try:
            for i in range(0, len(x), 4):
                yield x[i:i + 4], y[i:i + 4]
        finally:
            closed.append(1)

    cb = EigenCAMCallback(validation_data=gen, n_samples=6)
    pinned = cb.samples[("eval", "val")]
    np.testing.assert_array_equal(pinned.x, x[:6])  # across a batch boundary
    np.testing.assert_array_equal(pinned.y, y[:6])
    assert calls == [1] and closed == [1]
    with pytest.raises(ValueError, match="may never end.*n_samples=<int>"):
        EigenCAMCallback(validation_data=gen, n_samples=None)
