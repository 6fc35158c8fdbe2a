"""Ultralytics YOLO classification and segmentation: what reaches MLflow (keys, steps, table
columns, card pixels), and a classification training that is the same, to the last digit of
``results.csv`` and the last bit of the weights, with and without the callback.

Module-scoped trainings: ``yolov8n-cls.yaml`` twice (2 epochs, plain and watched; ~10 s each
on 2 cores) on ImageFolder shapes, ``yolov8n-seg.yaml`` once (1 epoch) on polygon shapes.
"""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from _yolo_shapes import write_cls_shapes, write_yolo_shapes
from mlflow_eigencam import _layout
from mlflow_eigencam.render import render_card
from mlflow_eigencam.ultralytics import EigenCAMCallback
from tests.helpers.readback import image_series, load_json, load_png

EPOCHS = 2
TRAIN = dict(imgsz=64, batch=8, device="cpu", workers=0, amp=False, plots=False, seed=0,
             deterministic=True, verbose=False)
NAMES = ("circle", "square", "triangle")


def _train(config: str, data: Path, project: Path, name: str, epochs: int, *callbacks: EigenCAMCallback):
    from ultralytics import YOLO

    model = YOLO(config)
    for callback in callbacks:
        callback.register(model)
    model.train(data=str(data), project=str(project), name=name, epochs=epochs, **TRAIN)
    return model.trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("yolo-tasks")
    cls_data = write_cls_shapes(tmp / "cls", n_train=24, n_val=6)
    seg_data = write_yolo_shapes(tmp / "seg", n_train=16, n_val=4, task="segment")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    previous_uri, threads = mlflow.get_tracking_uri(), torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_EIGENCAM_SPOOL_DIR", str(tmp / "spool"))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        torch.set_num_threads(1)  # bit-exact with / without (see test_ultralytics.py)
        try:
            experiment = mlflow.create_experiment("yolo-tasks", artifact_location=(tmp / "artifacts").as_uri())
            plain = _train("yolov8n-cls.yaml", cls_data, tmp / "runs", "cls-plain", EPOCHS)
            cls_cb = EigenCAMCallback(n_samples=3)
            with mlflow.start_run(experiment_id=experiment) as cls_run:
                watched = _train("yolov8n-cls.yaml", cls_data, tmp / "runs", "cls-watched", EPOCHS, cls_cb)
            seg_cb = EigenCAMCallback(n_samples=2, conf=0.0)
            with mlflow.start_run(experiment_id=experiment) as seg_run:
                _train("yolov8n-seg.yaml", seg_data, tmp / "runs", "seg", 1, seg_cb)
        finally:
            mlflow.set_tracking_uri(previous_uri)
            torch.set_num_threads(threads)
    yield SimpleNamespace(plain=plain, watched=watched, cls_id=cls_run.info.run_id, cls_cb=cls_cb,
                          seg_id=seg_run.info.run_id, seg_cb=seg_cb, cls_data=cls_data,
                          client=MlflowClient(uri))


def _results(trainer) -> list:
    with open(trainer.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k.strip(): v for k, v in row.items() if k.strip() != "time"} for row in rows]


def _rows(runs, run_id: str) -> list:
    table = load_json(runs.client, run_id, _layout.table_path("eval", "val"))
    return [dict(zip(table["columns"], row)) for row in table["data"]]


@pytest.mark.slow  # trains (the module's shared runs)
def test_classify_training_results_are_unchanged(runs):
    assert len(_results(runs.plain)) == EPOCHS
    assert _results(runs.watched) == _results(runs.plain)  # loss, accuracy, lr: every digit
    for name in ("model", "ema"):
        a, b = (t.model if name == "model" else t.ema.ema for t in (runs.plain, runs.watched))
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        for (module, ma), (_, mb) in zip(a.named_modules(), b.named_modules()):
            assert ma.training == mb.training, module
            assert len(ma._forward_hooks) == len(mb._forward_hooks), module


@pytest.mark.slow  # trains (the module's shared runs)
def test_classify_logs_the_classify_heads_input_with_class_and_faithfulness(runs):
    series = image_series(runs.client, runs.cls_id)
    assert {k: sorted(v) for k, v in series.items()} == {
        f"eigencam/eval/val/sample_{i}": [0, 1] for i in range(3)}
    # yolov8n-cls: blocks 0-8, the Classify head at 9 reads block 8 (stride 32).
    assert runs.cls_cb.target_layer_tag == "model.8 (P5, 256 channels)"
    rows = _rows(runs, runs.cls_id)
    assert [r["epoch"] for r in rows] == [0, 0, 0, 1, 1, 1]
    # Pinned evenly over the ImageFolder (listed class by class): one image of each class.
    assert [r["label"] for r in rows] == list(NAMES) * 2
    assert all(r["prediction"] in NAMES for r in rows)
    assert all(r["correct"] == (r["label"] == r["prediction"]) for r in rows)
    assert all(r["evr_1"] >= r["evr_2"] >= r["evr_3"] > 0 for r in rows)  # n_components=3
    assert all(-1.0 <= r["faithfulness"] <= 1.0 for r in rows)
    assert "n_boxes" not in rows[0] and "localization" not in rows[0]
    tags = runs.client.get_run(runs.cls_id).data.tags
    assert tags[_layout.TAG_TARGET_LAYER] == runs.cls_cb.target_layer_tag


@pytest.mark.slow  # trains (the module's shared runs)
def test_classify_card_shows_the_image_the_validator_sees(runs):
    """The input tile is the validation PNG (64 x 64: the validator's resize and centre crop
    leave it as it is), pixel for pixel what the renderer draws for it."""
    row = _rows(runs, runs.cls_id)[4]  # epoch 1, the square
    card = load_png(runs.client, runs.cls_id, row["image"])
    path = sorted((runs.cls_data / "val" / "square").glob("*.png"))[0]
    image = np.asarray(Image.open(path).convert("RGB"))
    expected = render_card(image, np.zeros((3, 2, 2), np.float32), label=row["label"],
                           pred=row["prediction"], sample_id=row["sample_id"])
    x, y, w, h = row["card"]["boxes"][0]
    assert card.shape == expected.shape
    np.testing.assert_array_equal(card[y:y + h, x:x + w], expected[y:y + h, x:x + w])


@pytest.mark.slow  # trains (the module's shared runs)
def test_segment_logs_the_head_inputs_fused_with_boxes(runs):
    series = image_series(runs.client, runs.seg_id)
    assert {k: sorted(v) for k, v in series.items()} == {f"eigencam/eval/val/sample_{i}": [0] for i in range(2)}
    assert runs.seg_cb.target_layer_tag.startswith(
        "model.15+model.18+model.21 (P3+P4+P5: max of each level's PC1")
    rows = _rows(runs, runs.seg_id)
    assert [r["n_true_boxes"] for r in rows] == [1, 1]
    assert all(r["n_boxes"] > 0 for r in rows)  # conf=0: every image has predictions
    assert all(0.0 <= r["localization"] <= 1.0 for r in rows)  # from the true boxes
    assert all(r["evr_1"] == 1.0 for r in rows)  # the fused map: one component
