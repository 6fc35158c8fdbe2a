"""Finding the target layer and reading its activations, for every kind of Keras model."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from mlflow_eigencam.keras import EigenCAMCallback
from mlflow_eigencam.sink import EigenCAMWarning
from tests.helpers.keras_models import build_cnn, build_nested, build_sequential


def _ready(model, x, **kwargs) -> EigenCAMCallback:
    cb = EigenCAMCallback(validation_data=(x, None), n_samples=len(x), **kwargs)
    cb.set_model(model)
    cb._prepare()
    return cb


def test_functional_default_is_the_last_spatial_layer(data):
    x, _ = data
    model = build_cnn()
    cb = _ready(model, x[:4])
    assert cb._target_path == "conv2"
    assert cb._forward.__name__ == "run_probe"
    # 40 samples: two probe batches (PROBE_BATCH_SIZE = 32), put back together in order.
    acts, preds = cb._explain(x[:40])
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
    assert cb._target_path == "wide"


def test_sequential_built_by_fit_without_input(data):
    x, y = data
    model = build_sequential()
    model.fit(x[:8], y[:8], epochs=1, verbose=0)
    cb = _ready(model, x[:3])
    assert cb._target_path == "sconv2"
    assert cb._forward.__name__ == "run_probe"  # in the model's own graph: a probe model
    acts, preds = cb._explain(x[:3])
    assert acts.shape == (3, 12, 20, 6)
    np.testing.assert_allclose(preds, np.asarray(model(x[:3])), rtol=1e-5, atol=1e-6)


def test_nested_backbone_is_picked_whole_and_inner_layers_work(data):
    x, _ = data
    model = build_nested()
    backbone = model.get_layer("backbone")
    cb = _ready(model, x[:3])
    assert cb._target_path == "backbone"
    acts, preds = cb._explain(x[:3])
    np.testing.assert_allclose(acts, np.asarray(backbone(x[:3])), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(preds, np.asarray(model(x[:3])), rtol=1e-5, atol=1e-6)

    inner = backbone.get_layer("conv_a")
    cb = _ready(model, x[:3], layer="conv_a")
    assert cb._target_path == "backbone/conv_a"
    acts, _ = cb._explain(x[:3])
    reference = keras.Model(backbone.inputs[0], inner.output)(x[:3])
    np.testing.assert_allclose(acts, np.asarray(reference), rtol=1e-5, atol=1e-6)
    assert acts.shape == (3, 24, 40, 6)
    assert "call" not in vars(inner)  # the temporary wrapper is gone
    cb = _ready(model, x[:3], layer=inner)  # a layer object works the same way
    assert cb._target_path == "backbone/conv_a"


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
    assert cb._target_path == "sub_c2"
    acts, _ = cb._explain(x[:2])
    assert acts.shape == (2, 12, 20, 4)
    np.testing.assert_allclose(acts, np.asarray(model.c2(model.c1(x[:2]))), rtol=1e-5, atol=1e-6)
    assert all("call" not in vars(layer) for layer in model.layers)


def test_unknown_layers_are_named_in_the_error(data):
    x, _ = data
    model = build_nested()
    cb = EigenCAMCallback(validation_data=(x[:2], None), layer="conv9")
    cb.set_model(model)
    with pytest.raises(ValueError, match=r"'conv9' is not in model 'nested'.*backbone/conv_b"):
        cb._prepare()
    stranger = keras.layers.Conv2D(2, 3, name="stranger")
    cb = EigenCAMCallback(validation_data=(x[:2], None), layer=stranger)
    cb.set_model(model)
    with pytest.raises(ValueError, match="'stranger'.*not part of model 'nested'"):
        cb._prepare()


def test_dense_only_model_says_what_to_pass(data):
    x, _ = data
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((24, 40, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    cb = EigenCAMCallback(validation_data=(x[:2], None))
    cb.set_model(model)
    with pytest.raises(ValueError, match="pass layer=<name>"):
        cb._prepare()


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
    acts, preds = cb._explain(x[:3])
    reference = keras.Model(backbone.inputs[0], backbone.get_layer("bb_last").output)(x[:3])
    np.testing.assert_allclose(acts, np.asarray(reference), rtol=1e-5, atol=1e-6)
    assert acts.shape == (3, 12, 20, 5)
    np.testing.assert_allclose(preds, np.asarray(model(x[:3])), rtol=1e-5, atol=1e-6)
    assert all("call" not in vars(layer) for layer, _ in __import__(
        "mlflow_eigencam.integrations.keras", fromlist=["_walk"])._walk(model))
    again, _ = _ready(model, x[:3], layer=cb.target_layer)._explain(x[:3])
    np.testing.assert_array_equal(again, acts)
