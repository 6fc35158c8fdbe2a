"""autolog.py with Keras 3: one call, images in MLflow; conventions of MLflow's autologging."""

from __future__ import annotations

import warnings

import mlflow
import pytest
from mlflow.tracking import MlflowClient

import mlflow_eigencam
from mlflow_eigencam.errors import EigenCAMWarning
from mlflow_eigencam.keras import EigenCAMCallback
from tests.helpers.keras_models import build_cnn, logged_images


@pytest.fixture(autouse=True)
def _autolog_off():
    yield
    mlflow_eigencam.autolog(disable=True)
    mlflow.autolog(disable=True)


def _only_run(uri):
    runs = MlflowClient(uri).search_runs(
        [e.experiment_id for e in MlflowClient(uri).search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0].info.run_id


def test_autolog_adds_the_callback_with_fits_validation_data(tracking_uri, data):
    x, y = data
    mlflow_eigencam.autolog(n_samples=3, n_components=2, silent=True)
    model = build_cnn()
    user_callbacks = []
    model.fit(x[:32], y[:32], validation_data=(x[32:], y[32:]), epochs=2, batch_size=16,
              verbose=0, callbacks=user_callbacks)
    assert user_callbacks == []  # the user's list is untouched
    rid = _only_run(tracking_uri)
    images = logged_images(tracking_uri, rid)
    assert sorted(images) == [f"eigencam/eval/val/sample_{i}" for i in range(3)]
    assert all(sorted(steps) == [0, 1] for steps in images.values())
    tags = MlflowClient(tracking_uri).get_run(rid).data.tags
    assert tags["mlflow_eigencam.target_layer"] == "conv2"
    assert MlflowClient(tracking_uri).get_run(rid).info.status == "FINISHED"


def test_autolog_uses_validation_split(tracking_uri, data):
    x, y = data
    mlflow_eigencam.autolog(n_samples=2, silent=True)
    build_cnn().fit(x, y, validation_split=0.25, epochs=1, batch_size=16, verbose=0)
    images = logged_images(tracking_uri, _only_run(tracking_uri))
    assert sorted(images) == ["eigencam/eval/val/sample_0", "eigencam/eval/val/sample_1"]


def test_no_duplicate_when_the_user_passed_a_callback(tracking_uri, data):
    x, y = data
    mlflow_eigencam.autolog(n_samples=4, silent=True)
    cb = EigenCAMCallback(validation_data=(x[32:], y[32:]), n_samples=2)
    build_cnn().fit(x[:32], y[:32], validation_data=(x[32:], y[32:]), epochs=1, verbose=0,
                    callbacks=[cb])
    images = logged_images(tracking_uri, _only_run(tracking_uri))
    # The user's callback (2 samples) ran, autolog's (4 samples) did not.
    assert sorted(images) == ["eigencam/eval/val/sample_0", "eigencam/eval/val/sample_1"]
    assert all(len(steps) == 1 for steps in images.values())


def test_disable_turns_it_off(tracking_uri, data):
    x, y = data
    mlflow_eigencam.autolog(silent=True)
    mlflow_eigencam.autolog(disable=True)
    with mlflow.start_run() as run:
        build_cnn().fit(x[:32], y[:32], validation_data=(x[32:], y[32:]), epochs=1, verbose=0)
    assert logged_images(tracking_uri, run.info.run_id) == {}


def test_an_error_inside_autolog_warns_and_fit_completes(tracking_uri, data):
    x, y = data
    mlflow_eigencam.autolog(layer="no_such_layer")
    model = build_cnn()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x[:32], y[:32], validation_data=(x[32:], y[32:]), epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2
    assert any("no_such_layer" in str(w.message) for w in caught)


def test_a_callback_that_cannot_be_built_warns_once_and_fit_is_unchanged(tracking_uri, data):
    """A setting only the Keras callback refuses (it sets image_layout itself) passes autolog()'s
    own check, fails inside the patch at fit: one warning for two fits, both fits complete."""
    x, y = data
    mlflow_eigencam.autolog(image_layout="NCHW")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with mlflow.start_run() as run:
                history = build_cnn().fit(x[:16], y[:16], validation_data=(x[32:], y[32:]), epochs=1,
                                          verbose=0)
            assert len(history.history["loss"]) == 1
            assert logged_images(tracking_uri, run.info.run_id) == {}
    ours = [w for w in caught if "could not add the EigenCAM callback" in str(w.message)]
    assert len(ours) == 1 and "image_layout" in str(ours[0].message)
    assert issubclass(ours[0].category, EigenCAMWarning)


def test_an_undo_that_fails_neither_hides_fits_result_nor_its_error(tracking_uri, data, monkeypatch):
    """The registry's contract: an integration's undo runs after fit; if it raises, fit's own
    return value (or exception) still reaches the user, with one warning."""
    import mlflow_eigencam.integrations.keras as integration

    real = integration.autolog_add_callback

    def add_with_a_broken_undo(original, owner, args, kw, settings):
        args, kw, _ = real(original, owner, args, kw, settings)

        def undo():
            raise RuntimeError("undo broke")

        return args, kw, undo

    monkeypatch.setattr(integration, "autolog_add_callback", add_with_a_broken_undo)
    x, y = data
    mlflow_eigencam.autolog(n_samples=2)
    model = build_cnn()
    with pytest.warns(EigenCAMWarning, match="could not remove its callback.*undo broke"):
        history = model.fit(x[:16], y[:16], validation_data=(x[32:], y[32:]), epochs=1, verbose=0)
    assert len(history.history["loss"]) == 1
    with pytest.raises(TypeError, match="integer"):  # fit's own error, not the undo's
        model.fit(x[:16], y[:16], validation_data=(x[32:], y[32:]), epochs="two", verbose=0)


def test_silent_autolog_says_nothing(tracking_uri, data):
    x, y = data
    mlflow_eigencam.autolog(image_layout="NCHW", silent=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mlflow.start_run():
            build_cnn().fit(x[:16], y[:16], epochs=1, verbose=0)
    assert not [w for w in caught if issubclass(w.category, EigenCAMWarning)]


@pytest.mark.parametrize("order", ["mlflow_first", "eigencam_first"])
def test_coexists_with_mlflow_autolog_in_one_run(tracking_uri, data, order):
    x, y = data
    if order == "mlflow_first":
        mlflow.autolog(log_models=False, silent=True)
        mlflow_eigencam.autolog(n_samples=2, silent=True)
    else:
        mlflow_eigencam.autolog(n_samples=2, silent=True)
        mlflow.autolog(log_models=False, silent=True)
    build_cnn().fit(x[:32], y[:32], validation_data=(x[32:], y[32:]), epochs=2, verbose=0)
    rid = _only_run(tracking_uri)
    run = MlflowClient(tracking_uri).get_run(rid)
    assert "loss" in run.data.metrics  # MLflow's own autologging
    assert "eigencam/eval/val/evr_1" in run.data.metrics  # ours
    images = logged_images(tracking_uri, rid)
    assert sorted(images) == ["eigencam/eval/val/sample_0", "eigencam/eval/val/sample_1"]
