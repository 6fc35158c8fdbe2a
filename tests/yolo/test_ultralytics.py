"""Ultralytics YOLO: what reaches MLflow (keys, steps, tables, card pixels), and a training
that is the same, to the last digit of ``results.csv`` and the last bit of the weights, with
and without the callback.

Three module-scoped trainings (2 epochs each, ~8 s on 2 cores) serve most tests: a plain one,
the same with the callback (boxes drawn at ``conf=0``), and one with two more callbacks (no
detection at ``conf=1``; one level by its index).
The example script runs in a subprocess, where Ultralytics' own MLflow callback is active
(under pytest Ultralytics turns it off unless the test's name holds "test_mlflow").
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from _yolo_shapes import write_yolo_shapes
from mlflow_eigencam import _layout
from mlflow_eigencam.render import render_detection_card
from mlflow_eigencam.samples import Boxes
from mlflow_eigencam.ultralytics import EigenCAMCallback
from tests.helpers import child_env
from tests.helpers.readback import image_series, load_json, load_png, metric_steps

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 2
TRAIN = dict(epochs=EPOCHS, imgsz=64, batch=8, device="cpu", workers=0, amp=False, plots=False,
             seed=0, deterministic=True, verbose=False)
HEAD_INPUTS = "model.15+model.18+model.21"


def _train(data: Path, project: Path, name: str, *callbacks: EigenCAMCallback, spy=None):
    return _train_with(data, project, name, *callbacks, spy=spy)


def _train_with(data: Path, project: Path, name: str, *callbacks: EigenCAMCallback, spy=None, **overrides):
    from ultralytics import YOLO

    model = YOLO("yolov8n.yaml")
    for callback in callbacks:
        callback.register(model)
    if spy is not None:
        model.add_callback("on_fit_epoch_end", lambda trainer: spy.append(int(trainer.epoch)))
    model.train(data=str(data), project=str(project), name=name, **dict(TRAIN, **overrides))
    return model.trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("yolo")
    data = write_yolo_shapes(tmp / "shapes")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    previous_uri, threads = mlflow.get_tracking_uri(), torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_EIGENCAM_SPOOL_DIR", str(tmp / "spool"))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        # One thread: conv backward's parallel reductions may sum in another order from run
        # to run on a busy machine, and the with/without comparison must be bit-exact.
        torch.set_num_threads(1)
        try:
            experiment = mlflow.create_experiment("yolo", artifact_location=(tmp / "artifacts").as_uri())
            plain = _train(data, tmp / "runs", "plain")
            boxes = EigenCAMCallback(conf=0.0, n_samples=3)
            _count_own_forwards(boxes)
            fit_epochs: list = []
            with mlflow.start_run(experiment_id=experiment) as run:
                watched = _train(data, tmp / "runs", "watched", boxes, spy=fit_epochs)
            # A third training for two more callbacks, kept out of the compared one: with three
            # loggers on one run, 2 of ~8 runs gave another epoch-2 train loss (the same other
            # value each time). Suspected, not reproduced when instrumented: the loggers' sender
            # threads set the same tags at once, and MLflow's sqlite store retries a losing
            # insert after `random.uniform` jitter, on the global `random` Ultralytics'
            # augmentations draw from.
            empty = EigenCAMCallback(conf=1.0, n_samples=2, ds_id="nodet")
            p3 = EigenCAMCallback(layers=15, n_samples=1, ds_id="p3")  # one level, by its index
            _count_own_forwards(p3)
            with mlflow.start_run(experiment_id=experiment) as extra:
                _train(data, tmp / "runs", "extra", empty, p3)
        finally:
            mlflow.set_tracking_uri(previous_uri)
            torch.set_num_threads(threads)
    yield SimpleNamespace(plain=plain, watched=watched, run_id=run.info.run_id,
                          extra_id=extra.info.run_id,
                          client=MlflowClient(uri), fit_epochs=fit_epochs, data=data, boxes=boxes, p3=p3)


def _count_own_forwards(callback: EigenCAMCallback) -> None:
    """Count the callback's own forward passes (``callback.own_forwards``)."""
    callback.own_forwards = 0
    forward = callback._forward

    def counted(*args, **kwargs):
        callback.own_forwards += 1
        return forward(*args, **kwargs)

    callback._forward = counted


def _results(trainer) -> list:
    with open(trainer.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k.strip(): v for k, v in row.items() if k.strip() != "time"} for row in rows]


def _run_of(runs, ds_id: str) -> str:
    return runs.run_id if ds_id == "val" else runs.extra_id


def _rows(runs, ds_id: str) -> list:
    table = load_json(runs.client, _run_of(runs, ds_id), _layout.table_path("eval", ds_id))
    return [dict(zip(table["columns"], row)) for row in table["data"]]


@pytest.mark.slow  # trains (the module's shared runs: ~20 s once)
def test_training_results_are_unchanged(runs):
    assert len(_results(runs.plain)) == EPOCHS
    assert _results(runs.watched) == _results(runs.plain)  # losses, metrics, lr: every digit
    for name in ("model", "ema"):
        a, b = (t.model if name == "model" else t.ema.ema for t in (runs.plain, runs.watched))
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


@pytest.mark.slow  # trains (the module's shared runs: ~20 s once)
def test_model_and_ema_hooks_flags_and_caches_as_without(runs):
    for attr in ("model", "ema"):
        a, b = (t.model if attr == "model" else t.ema.ema for t in (runs.plain, runs.watched))
        for (name, ma), (_, mb) in zip(a.named_modules(), b.named_modules()):
            assert ma.training == mb.training, name
            for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
                assert len(getattr(ma, hooks)) == len(getattr(mb, hooks)), (name, hooks)
    # The pinned pass (3 images) must not leave its batch shape in the EMA head's cache.
    assert runs.watched.ema.ema.model[-1].shape == runs.plain.ema.ema.model[-1].shape


@pytest.mark.slow  # trains (the module's shared runs: ~20 s once)
def test_images_at_each_epoch_final_eval_not_logged(runs):
    assert runs.fit_epochs == [0, 1, EPOCHS]  # the last call is final_eval on best.pt
    series = image_series(runs.client, runs.run_id)
    assert {k: sorted(v) for k, v in series.items()} == {
        f"eigencam/eval/val/sample_{i}": [0, 1] for i in range(3)}
    extra = image_series(runs.client, runs.extra_id)
    expected = {f"eigencam/eval/nodet/sample_{i}": [0, 1] for i in range(2)}
    expected["eigencam/eval/p3/sample_0"] = [0, 1]
    assert {k: sorted(v) for k, v in extra.items()} == expected
    evr = metric_steps(runs.client, runs.run_id, _layout.metric_key("eval", "val", 1))
    assert [step for step, _ in evr] == [0, 1]
    assert runs.boxes.target_layer_tag.startswith(f"{HEAD_INPUTS} (P3+P4+P5: max of each level's PC1")
    assert runs.p3.target_layer_tag == "model.15 (P3, 64 channels)"
    tags = runs.client.get_run(runs.run_id).data.tags
    assert tags[_layout.TAG_TARGET_LAYER] == runs.boxes.target_layer_tag


@pytest.mark.slow  # trains (the module's shared runs: ~20 s once)
def test_fused_maps_come_from_the_validators_forward(runs):
    """The default (fused) layers are read from the validator's own forward: no forward pass
    of the callback's; one layer of a letterboxed detector takes one per logged epoch."""
    assert runs.boxes.own_forwards == 0
    assert runs.p3.own_forwards == EPOCHS


@pytest.mark.slow  # trains (the module's shared runs: ~20 s once)
def test_one_level_by_index_is_plain_eigencam_with_its_components(runs):
    p3, fused = _rows(runs, "p3"), _rows(runs, "val")
    assert all(r["evr_1"] >= r["evr_2"] >= r["evr_3"] > 0 for r in p3)  # n_components=3
    assert "evr_2" not in fused[0] and all(r["evr_1"] == 1.0 for r in fused)  # the fused map


@pytest.mark.slow  # trains (the module's shared runs: ~20 s once)
def test_boxes_counted_and_no_detection_still_logs(runs):
    val = _rows(runs, "val")
    assert [r["epoch"] for r in val] == [0, 0, 0, 1, 1, 1]
    assert all(r["n_boxes"] > 0 for r in val)  # conf=0: every image has predictions
    assert [r["n_true_boxes"] for r in val] == [1, 1, 1] * 2
    nodet = _rows(runs, "nodet")
    assert [r["epoch"] for r in nodet] == [0, 0, 1, 1]
    assert all(r["n_boxes"] == 0 and r["prediction"] == "0 boxes" for r in nodet)
    assert all(r["image"] for r in nodet)
    # The same pinned images at every epoch and in both runs.
    assert {r["sample_id"] for r in val[:2]} == {r["sample_id"] for r in nodet}


@pytest.mark.slow  # trains (the module's shared runs: ~20 s once)
def test_card_shows_the_letterboxed_image_unpadded_with_its_true_box(runs):
    """The input panel is the 48 x 64 validation image (no grey padding) with its true box,
    pixel for pixel what the renderer draws for it."""
    row = _rows(runs, "nodet")[2]  # epoch 1, first image
    card = load_png(runs.client, runs.extra_id, row["image"])
    image = np.asarray(Image.open(runs.data.parent / "images" / "val" / "val_000.png").convert("RGB"))
    assert image.shape == (48, 64, 3)
    cls, xc, yc, w, h = (float(v) for v in
                         (runs.data.parent / "labels" / "val" / "val_000.txt").read_text().split())
    truth = np.array([[(xc - w / 2) * 64, (yc - h / 2) * 48, (xc + w / 2) * 64, (yc + h / 2) * 48]])
    names = ("circle", "square", "triangle")
    expected = render_detection_card(
        image, np.zeros((1, 8, 8), np.float32),  # the fused map: one component
        pred_boxes=Boxes(np.zeros((0, 4)), (), np.zeros(0)),
        true_boxes=Boxes(truth, (names[int(cls)],), None),
        explained_variance=np.array([row["evr_1"]]),
        label="1 box", pred="0 boxes", sample_id=row["sample_id"])
    assert card.shape == expected.shape
    top, left = card.shape[0] * 2 // 5, card.shape[1] // 2 - 4  # the input tile, title included
    np.testing.assert_array_equal(card[:top, :left], expected[:top, :left])
    padded = render_detection_card(np.zeros((64, 64, 3), np.uint8), np.zeros((1, 8, 8), np.float32))
    assert padded.shape != card.shape


def test_constructor_names_bad_values():
    with pytest.raises(TypeError, match="layers"):
        EigenCAMCallback(layers="P3")
    with pytest.raises(ValueError, match="n_samples"):
        EigenCAMCallback(n_samples=0)
    with pytest.raises(ValueError, match="conf"):
        EigenCAMCallback(conf=1.5)
    with pytest.raises(ValueError, match="nope"):  # a logger argument, checked now too
        EigenCAMCallback(colormap="nope")
    with pytest.raises(TypeError, match="register"):
        EigenCAMCallback().register(object())


@pytest.mark.slow  # trains in its own process / run
def test_one_line_autolog_example_logs_into_ultralytics_run(tmp_path):
    """examples/ultralytics_quickstart.py: ``autolog()`` and a plain ``YOLO.train``; the images
    land in the run Ultralytics' MLflow callback starts, at the steps of its metrics."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = child_env()
    # As a user runs it: Ultralytics' MLflow callback is off under pytest and GitHub Actions.
    for key in ("PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    env["MLFLOW_EIGENCAM_SPOOL_DIR"] = str(tmp_path / "spool")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "ultralytics_quickstart.py"),
                           "--epochs", str(EPOCHS), "--n-samples", "3", "--train-size", "16",
                           "--tracking-uri", uri, "--out", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run_id = re.search(r"to run ([0-9a-f]{32})", proc.stdout).group(1)
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [run_id]  # no second run: Ultralytics' own
    run = runs[0]
    assert run.info.run_name == "quickstart" and run.info.status == "FINISHED"
    assert run.data.params["imgsz"] == "64"  # Ultralytics' callback logged its args here
    map50 = [step for step, _ in metric_steps(client, run_id, "metrics/mAP50B")]
    assert map50 == [0, 1, EPOCHS]  # EPOCHS: final_eval of best.pt
    series = image_series(client, run_id)
    assert {k: sorted(v) for k, v in series.items()} == {
        f"eigencam/eval/val/sample_{i}": map50[:-1] for i in range(3)}


@pytest.mark.slow  # trains in its own process / run
def test_autolog_adds_the_callback_to_one_train_only(tmp_path, tracking_uri):
    import mlflow_eigencam
    from ultralytics import YOLO

    data = write_yolo_shapes(tmp_path / "shapes", n_train=8, n_val=2)
    model = YOLO("yolov8n.yaml")
    mlflow_eigencam.autolog(n_samples=2, silent=True)
    try:
        with mlflow.start_run() as run:
            model.train(data=str(data), project=str(tmp_path / "runs"), name="auto", **dict(TRAIN, epochs=1))
    finally:
        mlflow_eigencam.autolog(disable=True)
    # The model's callbacks are as before train(): a later train() starts clean.
    assert not any(isinstance(getattr(fn, "__self__", None), EigenCAMCallback)
                   for fns in model.callbacks.values() for fn in fns)
    series = image_series(MlflowClient(tracking_uri), run.info.run_id)
    assert {k: sorted(v) for k, v in series.items()} == {
        f"eigencam/eval/val/sample_{i}": [0] for i in range(2)}


@pytest.mark.slow  # trains 3 epochs of 48 images (~45 s on 2 cores)
def test_heat_lies_on_the_true_boxes_after_a_few_epochs(tmp_path, tracking_uri):
    """The logger's ``localization`` (the share of a map's positive mass inside the true box,
    docs/signals.md), read back from the run's table, beats the box's share of the image:
    the heat lies on the objects more than on the background, for the fused P3-P5 map and
    for P3 alone, whose share grows as the model learns.

    Settings that learn in 3 epochs: ``nbs=8`` (an optimizer step per batch of 8; at the
    default 64 the first step comes after 8 batches) and no warm-up (its first 100 steps
    keep the learning rate near 0); square validation images (the validator still
    letterboxes them: a 96 x 96 canvas at imgsz 64). Measured (yolov8n at random init,
    seed 0, 2-core CPU): box share 0.233 (mean of 7); fused 0.457, 0.428, 0.388 at epochs
    0-2, P3 0.409, 0.441, 0.510, each time 7 of 7 above their box's share. On the default
    48 x 64 images: box share 0.168, fused 0.231-0.248 (6-7 of 7), P3 0.229-0.235."""
    from mlflow_eigencam.metrics import true_region

    data = write_yolo_shapes(tmp_path / "shapes", n_train=48, n_val=8, val_size=(64, 64))
    fused = EigenCAMCallback(n_samples=7)  # the 7 images with a shape (the 8th has none)
    p3 = EigenCAMCallback(n_samples=7, layers=15, ds_id="p3")
    with mlflow.start_run() as run:
        _train_with(data, tmp_path / "runs", "loc", fused, p3, epochs=3, nbs=8, warmup_epochs=0)
    shares = []
    for i in range(7):
        label = data.parent / "labels" / "val" / f"val_{i:03d}.txt"
        cls, xc, yc, w, h = (float(v) for v in label.read_text().split())
        box = np.array([[(xc - w / 2) * 64, (yc - h / 2) * 64, (xc + w / 2) * 64, (yc + h / 2) * 64]])
        shares.append(true_region(64, 64, box).mean())
    client = MlflowClient(tracking_uri)

    def localization(ds_id: str, epoch: int) -> list:
        table = load_json(client, run.info.run_id, _layout.table_path("eval", ds_id))
        rows = [r for r in (dict(zip(table["columns"], row)) for row in table["data"]) if r["epoch"] == epoch]
        return [r["localization"] for r in sorted(rows, key=lambda r: r["sample_index"])]

    for ds_id in ("val", "p3"):
        loc = localization(ds_id, 2)
        assert len(loc) == 7
        assert np.mean(loc) > 1.2 * np.mean(shares), (ds_id, loc, shares)
        assert sum(a > s for a, s in zip(loc, shares)) >= 5, (ds_id, loc, shares)
    assert np.mean(localization("p3", 2)) > np.mean(localization("p3", 0))
