"""Ultralytics YOLO classification and segmentation: what reaches MLflow (keys, steps, table
columns, card pixels), and trainings that are the same, to the last digit of ``results.csv``
and the last bit of the weights, with and without the callback.

Module-scoped trainings, each plain and watched: ``yolov8n-cls.yaml`` (2 epochs; ~10 s each on
2 cores) on ImageFolder shapes, ``yolov8n-seg.yaml`` (1 epoch) on polygon shapes, whose
cards show masks.
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
from PIL import Image, ImageDraw

from _yolo_shapes import write_cls_shapes, write_yolo_shapes
from mlflow_eigencam import _layout
from mlflow_eigencam.integrations._ultralytics_outputs import detections, predicted_mask
from mlflow_eigencam.render import TRUTH_MASK_COLOUR, box_colour, render_card
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
            seg_plain = _train("yolov8n-seg.yaml", seg_data, tmp / "runs", "seg-plain", 1)
            seg_cb = EigenCAMCallback(n_samples=2, conf=0.0)
            with mlflow.start_run(experiment_id=experiment) as seg_run:
                seg_watched = _train("yolov8n-seg.yaml", seg_data, tmp / "runs", "seg", 1, seg_cb)
        finally:
            mlflow.set_tracking_uri(previous_uri)
            torch.set_num_threads(threads)
    yield SimpleNamespace(plain=plain, watched=watched, cls_id=cls_run.info.run_id, cls_cb=cls_cb,
                          cls_data=cls_data, seg_plain=seg_plain, seg_watched=seg_watched,
                          seg_id=seg_run.info.run_id, seg_cb=seg_cb, seg_data=seg_data, client=MlflowClient(uri))


def _results(trainer) -> list:
    with open(trainer.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k.strip(): v for k, v in row.items() if k.strip() != "time"} for row in rows]


def _rows(runs, run_id: str) -> list:
    table = load_json(runs.client, run_id, _layout.table_path("eval", "val"))
    return [dict(zip(table["columns"], row)) for row in table["data"]]


@pytest.mark.slow  # trains (the module's shared runs)
@pytest.mark.parametrize("task", ["classify", "segment"])
def test_training_results_are_unchanged(runs, task):
    plain, watched = (runs.plain, runs.watched) if task == "classify" else (runs.seg_plain, runs.seg_watched)
    assert len(_results(plain)) == (EPOCHS if task == "classify" else 1)
    assert _results(watched) == _results(plain)  # losses, metrics, lr: every digit
    for name in ("model", "ema"):
        a, b = (t.model if name == "model" else t.ema.ema for t in (plain, watched))
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
    # The top class's probability: the Classify head's softmax, taken once (3 classes: > 1/3).
    assert all(1 / 3 <= r["confidence"] <= 1.0 for r in rows)
    assert all(r["evr_1"] >= r["evr_2"] >= r["evr_3"] > 0 for r in rows)  # n_components=3
    assert all(-1.0 <= r["faithfulness"] <= 1.0 for r in rows)
    assert "n_boxes" not in rows[0] and "localization" not in rows[0]
    tags = runs.client.get_run(runs.cls_id).data.tags
    assert tags[_layout.TAG_TARGET_LAYER] == runs.cls_cb.target_layer_tag


@pytest.mark.slow  # trains (the module's shared runs)
def test_classify_card_shows_the_image_the_validator_sees(runs):
    """The input tile is the validation PNG (64 x 64: the validator's resize and centre crop
    leave it as it is), pixel for pixel what the renderer draws for it; the caption writes
    the top class's probability after it ("pred: square 0.41")."""
    row = _rows(runs, runs.cls_id)[4]  # epoch 1, the square
    card = load_png(runs.client, runs.cls_id, row["image"])
    path = sorted((runs.cls_data / "val" / "square").glob("*.png"))[0]
    image = np.asarray(Image.open(path).convert("RGB"))
    expected = render_card(image, np.zeros((3, 2, 2), np.float32), label=row["label"],
                           pred=f"{row['prediction']} {row['confidence']:.2f}", sample_id=row["sample_id"])
    x, y, w, h = row["card"]["boxes"][0]
    assert card.shape == expected.shape
    np.testing.assert_array_equal(card[y:y + h, x:x + w], expected[y:y + h, x:x + w])
    bottom = max(by + bh for _, by, _, bh in row["card"]["boxes"])  # the caption is below the panels
    np.testing.assert_array_equal(card[bottom:], expected[bottom:])
    plain = render_card(image, np.zeros((3, 2, 2), np.float32), label=row["label"], pred=row["prediction"],
                        sample_id=row["sample_id"])
    assert not np.array_equal(card[bottom:], plain[bottom:])


@pytest.mark.slow  # trains (the module's shared runs)
def test_segment_logs_the_head_inputs_fused_with_masks(runs):
    series = image_series(runs.client, runs.seg_id)
    assert {k: sorted(v) for k, v in series.items()} == {f"eigencam/eval/val/sample_{i}": [0] for i in range(2)}
    assert runs.seg_cb.target_layer_tag.startswith(
        "model.15+model.18+model.21 (P3+P4+P5: max of each level's PC1")
    rows = _rows(runs, runs.seg_id)
    truth = [_polygon(runs.seg_data, i) for i in range(2)]
    # Masks, not boxes: YOLO class c is mask class c + 1, class 0 the background.
    assert [r["classes"] for r in rows] == [["background", NAMES[c]] for c, _ in truth]
    assert [r["label"] for r in rows] == [f"background, {NAMES[c]}" for c, _ in truth]
    for r in rows:  # boxes too: in the table, and in the overlay cell with name and confidence
        assert r["n_boxes"] >= 1 and r["n_true_boxes"] is None
        assert len(r["overlay"]["pred"]) == r["n_boxes"] and "true" not in r["overlay"]
        assert all(name in NAMES and 0.0 <= score <= 1.0 for *_, name, score in r["overlay"]["pred"])
    for r in rows:  # conf=0: every image has predicted masks, named after the classes
        assert set(r["prediction"].split(", ")) <= {"background", *NAMES}
        assert 0.0 <= r["iou"] <= 1.0
        assert 0.0 <= r["localization"] <= 1.0  # from the true mask
        assert r["evr_1"] == 1.0  # the fused map: one component


@pytest.mark.slow  # trains (the module's shared runs)
def test_segment_card_outlines_the_true_polygon_in_white(runs):
    """The input panel shows the true mask as white outlines where the label's polygon is
    (the validation images are 48 x 64: letterboxed by the validator, mapped back)."""
    for row, (_, polygon) in zip(_rows(runs, runs.seg_id), (_polygon(runs.seg_data, i) for i in range(2))):
        card = load_png(runs.client, runs.seg_id, row["image"])
        x, y, w, h = row["card"]["boxes"][0]
        panel = card[y:y + h, x:x + w]
        white = np.all(panel == TRUTH_MASK_COLOUR, axis=-1)
        # The polygon at the panel's scale; its edge band, 2 panel pixels either side.
        inside = Image.new("L", (w, h), 0)
        ImageDraw.Draw(inside).polygon([(px * w, py * h) for px, py in polygon], fill=1)
        band = _edge_band(np.asarray(inside, bool), 2)
        assert white.sum() >= 0.5 * band.sum() / 4  # the outline runs all round (band: ~4 px wide)
        assert (white & ~band).sum() <= 0.02 * white.sum()  # and nowhere else


@pytest.mark.slow  # trains (the module's shared runs)
def test_segment_card_draws_the_boxes_over_the_masks(runs):
    """Boxes and masks on one card: the most confident box (drawn last, on top) outlines its
    place on the input panel in its class's colour (left and right edges, +-1 px)."""
    for row in _rows(runs, runs.seg_id):
        card = load_png(runs.client, runs.seg_id, row["image"])
        x, y, w, h = row["card"]["boxes"][0]
        panel = card[y:y + h, x:x + w]
        x1, y1, x2, y2, name, _ = max(row["overlay"]["pred"], key=lambda p: p[5])
        sx, sy = w / 64, h / 48
        span = slice(int(round(y1 * sy)), max(int(round(y1 * sy)) + 1, int(round(y2 * sy)) - 1))
        for col in (int(round(x1 * sx)), int(round(x2 * sx)) - 1):
            band = panel[span, max(0, col - 1):col + 2]
            assert np.all(band == box_colour(name), axis=-1).any(axis=1).mean() >= 0.9


def test_predicted_mask_is_taken_off_the_letterbox_like_the_boxes():
    """One detection of class 1 at canvas box (10, 20)-(30, 40) of a 64 x 64 canvas whose
    image (48 x 64) is centred 8 rows down: its mask is that box 8 rows up, painted 2; an
    overlapping, less confident class 0 detection loses the shared pixels."""
    proto = torch.ones((1, 16, 16))  # one prototype, positive everywhere: the mask is the box
    rows = torch.tensor([[10.0, 20.0, 30.0, 40.0, 0.9, 1.0, 1.0],
                         [20.0, 20.0, 40.0, 40.0, 0.5, 0.0, 1.0]])
    got = predicted_mask(proto, rows, (64, 64), (8, 0), (48, 64))
    expected = np.zeros((48, 64), np.int32)
    expected[12:32, 30:40] = 1
    expected[12:32, 10:30] = 2
    np.testing.assert_array_equal(got, expected)
    dets = detections([rows], [(48, 64)], [(8, 0)])[0]
    np.testing.assert_allclose(dets["boxes"][0], [10, 12, 30, 32])  # the boxes' mapping, the same
    assert predicted_mask(proto, rows[:0], (64, 64), (8, 0), (48, 64)).max() == 0


def _polygon(data_yaml: Path, i: int):
    """Validation image ``i``'s class and polygon (normalised xy pairs) from its label file."""
    values = (data_yaml.parent / "labels" / "val" / f"val_{i:03d}.txt").read_text().split()
    xy = [float(v) for v in values[1:]]
    return int(values[0]), list(zip(xy[0::2], xy[1::2]))


def _edge_band(inside: np.ndarray, r: int) -> np.ndarray:
    """The pixels within ``r`` of a region's edge (a square neighbourhood)."""
    padded = np.pad(inside, r, mode="edge")
    h, w = inside.shape
    shifts = [padded[dy:dy + h, dx:dx + w] for dy in range(2 * r + 1) for dx in range(2 * r + 1)]
    return np.logical_or.reduce(shifts) & ~np.logical_and.reduce(shifts)
