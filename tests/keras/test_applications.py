"""Real architectures from keras.applications (random init, small inputs): the right tensor.

ConvNeXt's feature map is no layer's output: the last block ends in ``inputs + branch`` (a
``keras.ops`` add), and the head pools that. The default must be that tensor, not the
branch (the ``..._identity`` layer), and every intermediate tensor must be nameable.
"""

from __future__ import annotations

import json
from typing import Tuple

import keras
import mlflow
import numpy as np
import pytest

from mlflow_eigencam.eigencam import eigencam
from mlflow_eigencam.keras import EigenCAMCallback

SIZE = 64  # stage 3 of ConvNeXtTiny is then 2 x 2, MobileNetV3Small's last map 2 x 2


def _images(n: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded images (n, 64, 64, 3) in [0, 255] (the models rescale them) and labels 0..2."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, size=(n, SIZE, SIZE, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for i in range(n):  # a bright square somewhere, so the maps have something to find
        r, c = rng.integers(8, SIZE - 24, size=2)
        x[i, r:r + 16, c:c + 16] = 255.0
    return x, rng.integers(0, 3, size=n)


def _svd_reference(acts: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Textbook EigenCAM of (B, h, w, C) activations: per-sample centred SVD, maps and ratios."""
    b, h, w, c = acts.shape
    maps, ratios = [], []
    for a in acts.astype(np.float64):
        x = a.reshape(h * w, c)
        x = x - x.mean(axis=0)
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        maps.append((x @ vt[:k].T).T.reshape(k, h, w))
        ratios.append(s[:k] ** 2 / (s ** 2).sum())
    return np.stack(maps), np.stack(ratios)


def _assert_maps_match_svd(acts: np.ndarray, k: int = 3) -> np.ndarray:
    """The package's maps equal the per-sample SVD up to sign; returns the SVD ratios."""
    ref_maps, ref_evr = _svd_reference(acts, k)
    got = eigencam(acts, k, channels_last=True)
    np.testing.assert_allclose(got.explained_variance_ratio, ref_evr, rtol=1e-3, atol=1e-5)
    for i in range(len(acts)):
        for j in range(k):
            if ref_evr[i, j] < 1e-6:
                continue
            a, b = got.maps[i, j].ravel(), ref_maps[i, j].ravel()
            cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
            assert abs(cos) > 0.999, (i, j, cos)
    return ref_evr


def _table(uri: str, run_id: str) -> list:
    local = mlflow.MlflowClient(uri).download_artifacts(run_id, "eigencam/eval/val/samples.json")
    with open(local) as f:
        table = json.load(f)
    return [dict(zip(table["columns"], r)) for r in table["data"]]


@pytest.fixture(scope="module")
def convnext():
    keras.utils.set_random_seed(0)
    model = keras.applications.ConvNeXtTiny(weights=None, input_shape=(SIZE, SIZE, 3), classes=3)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    return model


def _block_parts(model):
    """The head's input tensor, and the two tensors the last block adds: (inputs, branch)."""
    gap = model.get_layer("convnext_tiny_head_gap")
    out = gap.input
    add = out._keras_history.operation
    assert not isinstance(add, keras.layers.Layer)  # an op, not a layer: nothing to name
    inputs, branch = add._inbound_nodes[0].input_tensors
    return out, inputs, branch, add


def _ready(model, x, **kwargs) -> EigenCAMCallback:
    cb = EigenCAMCallback(validation_data=(x, None), n_samples=len(x), **kwargs)
    cb.set_model(model)
    cb.activations(x[:1])  # resolves the target layer, as fit's first epoch would
    return cb


def test_convnext_default_is_the_block_output_the_head_pools(convnext, tracking_uri):
    model = convnext
    x, y = _images(10)
    cb = EigenCAMCallback(validation_data=(x[8:], y[8:]), n_samples=2)
    with mlflow.start_run() as run:
        model.fit(x[:8], y[:8], epochs=1, batch_size=4, verbose=0, callbacks=[cb])
    assert cb.target_layer == "convnext_tiny_head_gap:input"
    tags = mlflow.MlflowClient(tracking_uri).get_run(run.info.run_id).data.tags
    assert tags["mlflow_eigencam.target_layer"] == "convnext_tiny_head_gap:input"

    out, inputs, branch, _ = _block_parts(model)
    assert branch._keras_history.operation.name == "convnext_tiny_stage_3_block_2_identity"
    ref_out, ref_in, ref_branch = (np.asarray(keras.ops.convert_to_numpy(t)) for t in
                                   keras.Model(model.inputs[0], [out, inputs, branch])(x[8:]))
    acts, _ = cb.activations(x[8:])
    assert acts.shape == (2, 2, 2, 768)
    np.testing.assert_allclose(acts, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(acts, ref_in + ref_branch, rtol=1e-4, atol=1e-4)  # inputs + branch
    assert not np.allclose(acts, ref_branch, atol=1e-3)  # not the branch the old default took

    # What MLflow got for epoch 0 (the weights after the only epoch) is the SVD of that tensor.
    evr = _assert_maps_match_svd(acts)
    rows = _table(tracking_uri, run.info.run_id)
    assert [r["epoch"] for r in rows] == [0, 0]
    got = np.array([[r[f"evr_{c}"] for c in (1, 2, 3)] for r in rows])
    np.testing.assert_allclose(got, evr, atol=1e-4)


def test_convnext_any_tensor_can_be_named(convnext):
    model = convnext
    x, _ = _images(2, seed=1)
    out, inputs, branch, add = _block_parts(model)
    want = {t: np.asarray(keras.ops.convert_to_numpy(v)) for t, v in
            zip(("out", "in", "branch"), keras.Model(model.inputs[0], [out, inputs, branch])(x))}

    for spec, path, key in [
        ("convnext_tiny_head_gap:input", "convnext_tiny_head_gap:input", "out"),
        (out, "convnext_tiny_head_gap:input", "out"),  # a KerasTensor
        (add.name, add.name, "out"),  # the op's own name
        (inputs, None, "in"),  # the previous block's output, another add
        ("convnext_tiny_stage_3_block_2_identity", "convnext_tiny_stage_3_block_2_identity", "branch"),
        ("convnext_tiny_stage_3_block_2_identity:output", "convnext_tiny_stage_3_block_2_identity", "branch"),
    ]:
        cb = _ready(model, x, layer=spec)
        if path is not None:
            assert cb.target_layer == path
        acts, _ = cb.activations(x)
        np.testing.assert_allclose(acts, want[key], rtol=1e-5, atol=1e-5, err_msg=str(spec))
        # What target_layer says is accepted back and names the same tensor.
        again, _ = _ready(model, x, layer=cb.target_layer).activations(x)
        np.testing.assert_allclose(again, acts, rtol=1e-6, atol=1e-6)

    stranger = keras.Input((SIZE, SIZE, 3))
    cb = EigenCAMCallback(validation_data=(x, None), layer=keras.layers.Conv2D(2, 3)(stranger))
    cb.set_model(model)
    with pytest.raises(ValueError, match="not a tensor of model 'convnext_tiny'"):
        cb.activations(x)
    cb = EigenCAMCallback(validation_data=(x, None), layer="no_such_layer:input")
    cb.set_model(model)
    with pytest.raises(ValueError, match=r"'no_such_layer:input' is not in model.*':input'"):
        cb.activations(x)
    with pytest.raises(TypeError, match="KerasTensor"):
        EigenCAMCallback(validation_data=(x, None), layer=3)


def test_convnext_is_left_as_it_was(convnext, tracking_uri):
    model = convnext
    x, y = _images(3, seed=2)
    layers = list(model.layers)
    weights = [w.copy() for w in model.get_weights()]
    trainable = [layer.trainable for layer in model.layers]
    cb = EigenCAMCallback(validation_data=(x, y), n_samples=3)
    cb.set_model(model)
    with mlflow.start_run():
        cb.on_train_begin()
        cb.on_epoch_end(0)
        cb.on_epoch_end(1)
        cb.on_train_end()
    assert list(model.layers) == layers
    assert [layer.trainable for layer in model.layers] == trainable
    assert all("call" not in vars(layer) for layer in model.layers)
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    first, _ = cb.activations(x)
    second, _ = cb.activations(x)
    np.testing.assert_array_equal(first, second)  # same images, same weights: same maps


def test_mobilenet_v3_small_default_feeds_the_head(tracking_uri):
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV3Small(weights=None, input_shape=(SIZE, SIZE, 3), classes=3)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x, y = _images(10, seed=3)
    cb = EigenCAMCallback(validation_data=(x[8:], y[8:]), n_samples=2)
    with mlflow.start_run() as run:
        model.fit(x[:8], y[:8], epochs=1, batch_size=4, verbose=0, callbacks=[cb])
    # The head's pooling is the last GlobalAveragePooling2D (the squeeze-excite blocks have
    # their own, earlier ones); what it takes is the last hard-swish activation's output.
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.GlobalAveragePooling2D)]
    head_in = pools[-1].input
    assert cb.target_layer == head_in._keras_history.operation.name
    acts, _ = cb.activations(x[8:])
    ref = np.asarray(keras.ops.convert_to_numpy(keras.Model(model.inputs[0], head_in)(x[8:])))
    assert acts.shape == ref.shape == (2, 2, 2, 576)
    np.testing.assert_allclose(acts, ref, rtol=1e-5, atol=1e-5)
    evr = _assert_maps_match_svd(acts)
    rows = _table(tracking_uri, run.info.run_id)
    got = np.array([[r[f"evr_{c}"] for c in (1, 2, 3)] for r in rows])
    np.testing.assert_allclose(got, evr, atol=1e-4)
