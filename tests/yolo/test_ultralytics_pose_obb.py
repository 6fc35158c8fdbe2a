"""Ultralytics YOLO pose and OBB: trainings with the callback log boxes (what reaches MLflow:
keys, steps, table cells, card pixels), with no warning.

Two module-scoped trainings of one epoch (~15 s for both on 2 cores): ``yolov8n-pose.yaml`` with
``mlflow_eigencam.autolog()`` on shapes whose label has one keypoint (the box centre), and
``yolov8n-obb.yaml`` with the callback on the same shapes labelled by their four corners.
The validation images are 48 x 64 (letterboxed by the validator), the last one background.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from _yolo_shapes import write_yolo_shapes
from mlflow_eigencam import _layout
from mlflow_eigencam.errors import EigenCAMWarning
from mlflow_eigencam.integrations._ultralytics_outputs import detections, obb_hulls
from mlflow_eigencam.render import TRUTH_BOX_COLOUR, box_colour
from mlflow_eigencam.ultralytics import EigenCAMCallback
from tests.helpers.readback import image_series, load_json, load_png

TRAIN = dict(epochs=1, imgsz=64, batch=8, device="cpu", workers=0, amp=False, plots=False, seed=0,
             deterministic=True, verbose=False)
NAMES = ("circle", "square", "triangle")
SETTINGS = dict(n_samples=2, conf=0.0, max_det=3)  # conf=0: boxes at random init too
HEAD_INPUTS = "model.15+model.18+model.21"


def _write(root: Path, task: str) -> Path:
    """The detection shapes (``class xc yc w h``) relabelled: pose, ``class xc yc w h kx ky v``
    with one visible keypoint at the box centre (``kpt_shape: [1, 3]``); OBB, ``class`` and
    the box's four corners ``x1 y1 ... x4 y4`` (clockwise from the top left)."""
    data = write_yolo_shapes(root, n_train=16, n_val=3)
    for label in (root / "labels").rglob("*.txt"):
        values = label.read_text().split()
        if not values:  # the background image
            continue
        c, (xc, yc, w, h) = values[0], (float(v) for v in values[1:])
        if task == "pose":
            line = f"{c} {xc:.6f} {yc:.6f} {w:.6f} {h:.6f} {xc:.6f} {yc:.6f} 2"
        else:
            x0, y0, x1, y1 = xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2
            line = f"{c} " + " ".join(f"{v:.6f}" for v in (x0, y0, x1, y0, x1, y1, x0, y1))
        label.write_text(line + "\n")
    if task == "pose":
        data.write_text(data.read_text() + "kpt_shape: [1, 3]\nflip_idx: [0]\n")
    return data


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import mlflow_eigencam
    from ultralytics import YOLO

    tmp = tmp_path_factory.mktemp("yolo-pose-obb")
    pose_data, obb_data = _write(tmp / "pose", "pose"), _write(tmp / "obb", "obb")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    previous_uri, threads = mlflow.get_tracking_uri(), torch.get_num_threads()
    obb_cb = EigenCAMCallback(**SETTINGS)
    own = []  # the OBB callback's own forward passes (none: the validator's rows are reused)
    forward = obb_cb._forward
    obb_cb._forward = lambda *a, **k: own.append(1) or forward(*a, **k)
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EigenCAMWarning)
        mp.setenv("MLFLOW_EIGENCAM_SPOOL_DIR", str(tmp / "spool"))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        torch.set_num_threads(1)
        try:
            experiment = mlflow.create_experiment("yolo-pose-obb", artifact_location=(tmp / "artifacts").as_uri())
            mlflow_eigencam.autolog(**SETTINGS, silent=True)
            try:
                with mlflow.start_run(experiment_id=experiment) as pose_run:
                    YOLO("yolov8n-pose.yaml").train(data=str(pose_data), project=str(tmp / "runs"), name="pose",
                                                    **TRAIN)
            finally:
                mlflow_eigencam.autolog(disable=True)
            model = YOLO("yolov8n-obb.yaml")
            obb_cb.register(model)
            with mlflow.start_run(experiment_id=experiment) as obb_run:
                model.train(data=str(obb_data), project=str(tmp / "runs"), name="obb", **TRAIN)
        finally:
            mlflow.set_tracking_uri(previous_uri)
            torch.set_num_threads(threads)
    yield SimpleNamespace(client=MlflowClient(uri), ids={"pose": pose_run.info.run_id, "obb": obb_run.info.run_id},
                          data={"pose": pose_data, "obb": obb_data}, obb_own_forwards=len(own),
                          warnings=[str(w.message) for w in caught if issubclass(w.category, EigenCAMWarning)])


def _rows(runs, task: str) -> list:
    table = load_json(runs.client, runs.ids[task], _layout.table_path("eval", "val"))
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def _true_box(data: Path, i: int) -> tuple:
    """Validation image ``i``'s class and box ``(x1, y1, x2, y2)`` in pixels of the 48 x 64
    image, from its label file (pose: the box columns; OBB: the corners' extent)."""
    values = [float(v) for v in (data.parent / "labels" / "val" / f"val_{i:03d}.txt").read_text().split()]
    if len(values) == 9:  # OBB corners
        xs, ys = values[1::2], values[2::2]
        return int(values[0]), (min(xs) * 64, min(ys) * 48, max(xs) * 64, max(ys) * 48)
    _, xc, yc, w, h = values[:5]
    return int(values[0]), ((xc - w / 2) * 64, (yc - h / 2) * 48, (xc + w / 2) * 64, (yc + h / 2) * 48)


@pytest.mark.slow  # trains (the module's shared runs)
def test_pose_and_obb_log_without_warning(runs):
    assert runs.warnings == []  # no "not supported" warning, no failure
    assert runs.obb_own_forwards == 0  # the fused maps came from the validator's forward
    for task in ("pose", "obb"):
        series = image_series(runs.client, runs.ids[task])
        assert {k: sorted(v) for k, v in series.items()} == {f"eigencam/eval/val/sample_{i}": [0] for i in range(2)}
        tags = runs.client.get_run(runs.ids[task]).data.tags
        assert tags[_layout.TAG_TARGET_LAYER].startswith(f"{HEAD_INPUTS} (P3+P4+P5: max of each level's PC1")


@pytest.mark.slow  # trains (the module's shared runs)
@pytest.mark.parametrize("task", ["pose", "obb"])
def test_table_has_the_predicted_and_true_boxes(runs, task):
    """The table counts the boxes; the overlay cell holds them: predicted ones with class name
    and confidence (OBB: upright hulls), the true one where its label puts it."""
    rows = _rows(runs, task)
    assert [r["epoch"] for r in rows] == [0, 0]
    assert [r["n_true_boxes"] for r in rows] == [1, 1]
    for i, r in enumerate(rows):
        assert 1 <= r["n_boxes"] <= SETTINGS["max_det"] and r["prediction"] == f"{r['n_boxes']} box" + (
            "es" if r["n_boxes"] > 1 else "")
        assert "iou" not in r and "classes" not in r  # boxes, not masks
        pred, true = r["overlay"]["pred"], r["overlay"]["true"]
        assert len(pred) == r["n_boxes"]
        for x1, y1, x2, y2, name, score in pred:
            assert 0 <= x1 <= x2 <= 64 and 0 <= y1 <= y2 <= 48  # image pixels, letterbox taken off
            assert name in NAMES and 0.0 <= score <= 1.0
        c, box = _true_box(runs.data[task], i)
        assert len(true) == 1 and true[0][4] == NAMES[c]
        np.testing.assert_allclose(true[0][:4], box, atol=0.11)


@pytest.mark.slow  # trains (the module's shared runs)
@pytest.mark.parametrize("task", ["pose", "obb"])
def test_card_draws_the_boxes(runs, task):
    """On the card's input panel: the true box's outline in white, and the most confident
    predicted box (drawn last, on top) in its class's colour."""
    for r in _rows(runs, task):
        card = load_png(runs.client, runs.ids[task], r["image"])
        x, y, w, h = r["card"]["boxes"][0]
        panel = card[y:y + h, x:x + w]
        best = max(r["overlay"]["pred"], key=lambda item: item[5])
        assert _edge(panel, best[:4], box_colour(best[4])) >= 0.9
        assert _edge(panel, r["overlay"]["true"][0][:4], TRUTH_BOX_COLOUR) >= 0.3  # predictions may cover some


def _edge(panel: np.ndarray, box, colour) -> float:
    """The share of a box's left and right edge pixels (+-1 px) in ``colour`` on a panel of
    the 48 x 64 image (``box`` in image pixels)."""
    sx, sy = panel.shape[1] / 64, panel.shape[0] / 48
    x1, y1, x2, y2 = box
    top = int(round(y1 * sy))
    bottom = max(top + 1, int(round(y2 * sy)) - 1)
    hits = []
    for col in (int(round(x1 * sx)), int(round(x2 * sx)) - 1):
        band = panel[top:bottom, max(0, col - 1):col + 2]
        hits.append(np.all(band == colour, axis=-1).any(axis=1))
    return float(np.concatenate(hits).mean())


def test_obb_rows_become_upright_hulls():
    """A 4 x 2 box at (10, 20) turned by 90 degrees holds (9, 18)-(11, 22); at 45 degrees its
    corners are 3 / sqrt(2) from the centre along both axes. The hull rows go through the
    detections' letterbox mapping like any box."""
    rows = torch.tensor([[10.0, 20.0, 4.0, 2.0, 0.8, 2.0, math.pi / 2],
                         [10.0, 20.0, 4.0, 2.0, 0.5, 1.0, math.pi / 4]])
    hulls = obb_hulls(rows)
    d = 3 / math.sqrt(2)
    np.testing.assert_allclose(hulls.numpy(), [[9, 18, 11, 22, 0.8, 2], [10 - d, 20 - d, 10 + d, 20 + d, 0.5, 1]],
                               atol=1e-5)
    assert obb_hulls(rows[:0]).shape == (0, 6)
    dets = detections([hulls], [(48, 64)], [(8, 0)])[0]
    np.testing.assert_allclose(dets["boxes"][0], [9, 10, 11, 14], atol=1e-5)
    assert dets["labels"].tolist() == [2, 1]
