"""The callback under every Keras 3 backend: a short fit, read back from MLflow.

Runs under whatever ``KERAS_BACKEND`` says: ``tensorflow`` in the ``keras`` tox env,
``torch`` in ``keras-torch`` (torch only, no TensorFlow installed) and ``jax`` in
``keras-jax``. Only numpy arrays, generator functions and PyDatasets are used here (a
``tf.data.Dataset`` needs TensorFlow), plus a torch ``DataLoader`` under the torch backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest

from mlflow_eigencam.eigencam import eigencam
from mlflow_eigencam.keras import EigenCAMCallback
from tests.helpers import child_env
from tests.helpers.keras_models import build_cnn, build_sequential, logged_images

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BACKEND = keras.backend.backend()


def _svd_evr(acts: np.ndarray, k: int = 3) -> np.ndarray:
    """Explained-variance ratios of a per-sample centred SVD of (B, h, w, C) activations."""
    out = []
    for a in acts.astype(np.float64):
        x = a.reshape(-1, a.shape[-1])
        s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
        out.append(s[:k] ** 2 / (s ** 2).sum())
    return np.stack(out)


def _table(uri: str, run_id: str) -> list:
    local = mlflow.MlflowClient(uri).download_artifacts(run_id, "eigencam/eval/val/samples.json")
    with open(local) as f:
        table = json.load(f)
    return [dict(zip(table["columns"], r)) for r in table["data"]]


def test_backend_is_the_one_asked_for():
    assert BACKEND == os.environ.get("KERAS_BACKEND", "tensorflow")


def test_fit_logs_every_epoch_and_maps_are_the_svd_of_the_layer(data, tracking_uri):
    x, y = data
    xv, yv = x[40:44], y[40:44]
    model = build_cnn()
    cb = EigenCAMCallback(validation_data=(xv, yv), n_samples=4, label_mapping=["a", "b", "c"])
    with mlflow.start_run() as run:
        history = model.fit(x[:32], y[:32], epochs=2, batch_size=8, verbose=0, callbacks=[cb])
    assert len(history.history["loss"]) == 2
    run_id = run.info.run_id
    images = logged_images(tracking_uri, run_id)
    assert set(images) == {f"eigencam/eval/val/sample_{i}" for i in range(4)}
    assert all(sorted(steps) == [0, 1] for steps in images.values())
    client = mlflow.MlflowClient(tracking_uri)
    tags = client.get_run(run_id).data.tags
    assert tags["mlflow_eigencam.target_layer"] == "conv2"  # the layer the head pools

    # What the last epoch logged is the SVD of conv2's output under the final weights: the
    # callback sees the weights training reached (JAX keeps them in a state it syncs back).
    ref = keras.Model(model.inputs[0], model.get_layer("conv2").output)(xv)
    ref = np.asarray(keras.ops.convert_to_numpy(ref))
    acts, preds = cb.activations(xv)
    np.testing.assert_allclose(acts, ref, rtol=1e-5, atol=1e-5)
    assert isinstance(acts, np.ndarray) and isinstance(preds, np.ndarray)
    np.testing.assert_allclose(preds, np.asarray(keras.ops.convert_to_numpy(model(xv))), rtol=1e-5, atol=1e-6)
    rows = [r for r in _table(tracking_uri, run_id) if r["epoch"] == 1]
    got = np.array([[r[f"evr_{c}"] for c in (1, 2, 3)] for r in rows])
    np.testing.assert_allclose(got, _svd_evr(acts), atol=1e-4)
    np.testing.assert_allclose(got, eigencam(acts, 3, channels_last=True).explained_variance_ratio, atol=1e-4)
    assert [r["label"] for r in rows] == [["a", "b", "c"][v] for v in yv]
    points = client.get_metric_history(run_id, "eigencam/eval/val/evr_1")
    assert sorted(p.step for p in points) == [0, 1]


def test_generator_function_and_pydataset_sequential(data, tracking_uri):
    x, y = data

    def gen():
        for i in range(0, 16, 4):
            yield x[i:i + 4], y[i:i + 4]

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return x[20 + 3 * i:23 + 3 * i], y[20 + 3 * i:23 + 3 * i]

    model = build_sequential(input_shape=(24, 40, 3))
    cb = EigenCAMCallback(validation_data={"gen": gen, "pyds": Batches()}, n_samples=5)
    with mlflow.start_run() as run:
        model.fit(x[:16], y[:16], epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    images = logged_images(tracking_uri, run.info.run_id)
    assert set(images) == {f"eigencam/eval/{ds}/sample_{i}" for ds in ("gen", "pyds") for i in range(5)}
    assert cb.target_layer == "sconv2"


@pytest.mark.skipif(BACKEND != "torch", reason="a torch DataLoader under the torch backend")
def test_torch_dataloader_and_no_autograd_graph(data, tracking_uri):
    import torch

    x, y = data
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(x[40:46]), torch.from_numpy(y[40:46])), batch_size=4)
    model = build_cnn()
    cb = EigenCAMCallback(validation_data=loader, n_samples=6)
    with mlflow.start_run() as run:
        model.fit(x[:16], y[:16], epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    assert len(logged_images(tracking_uri, run.info.run_id)) == 6
    # The one private read left: the backend tensors before they become numpy (only they
    # carry requires_grad); activations() returns numpy arrays.
    a, out = cb._forward(x[:2])
    assert not a.requires_grad and not out.requires_grad  # run under torch.no_grad()
    assert torch.is_grad_enabled()  # and the user's autograd state is as it was


@pytest.mark.skipif(BACKEND == "tensorflow", reason="TensorFlow is the backend here")
def test_the_callback_never_imports_tensorflow(tmp_path):
    """A fresh process that records every lookup of tensorflow: none comes from us."""
    script = textwrap.dedent(f"""
        import importlib.abc, sys, traceback
        attempts = []

        class Spy(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "tensorflow" or name.startswith("tensorflow."):
                    attempts.append("".join(traceback.format_stack()))
                return None  # recorded; found (or not) as usual

        sys.meta_path.insert(0, Spy())
        import keras, mlflow
        from tests.helpers.keras_models import build_cnn, make_images
        from mlflow_eigencam.keras import EigenCAMCallback
        mlflow.set_tracking_uri("sqlite:///{tmp_path / 'm.db'}")
        x, y = make_images(12)
        cb = EigenCAMCallback(validation_data=(x[8:], y[8:]), n_samples=2)
        with mlflow.start_run():
            build_cnn().fit(x[:8], y[:8], epochs=1, verbose=0, callbacks=[cb])
        ours = [a for a in attempts if "mlflow_eigencam" in a]
        print("OURS", len(ours), "TF_LOADED", "tensorflow" in sys.modules, keras.backend.backend())
        print("".join(ours[:1]))
    """)
    env = child_env(MLFLOW_EIGENCAM_SPOOL_DIR=str(tmp_path / "spool"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"OURS 0 TF_LOADED False {BACKEND}" in proc.stdout, proc.stdout[-3000:]
