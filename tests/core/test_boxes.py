"""Detections without any framework: boxes drawn on pixels, kept per sample, counted in the
caption and the table of a real MLflow run."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mlflow_eigencam import EigenCAMLogger
from mlflow_eigencam.render import (
    TRUTH_BOX_COLOUR,
    box_colour,
    card_geometry,
    draw_boxes,
    render_card,
    render_detection_card,
)
from mlflow_eigencam.samples import SampleBuffer
from tests.helpers.readback import image_series, load_json, load_png

GREY = (90, 90, 90)


def _grey(h=40, w=60):
    return np.full((h, w, 3), GREY, np.uint8)


def test_draw_boxes_outlines_exactly_the_box_in_its_class_colour():
    out = draw_boxes(_grey(), (np.array([[10.0, 5.0, 30.0, 25.0]]), ["cat"], None), thickness=1,
                     text=False)
    colour = np.array(box_colour("cat"))
    assert box_colour("cat") == box_colour("cat") and box_colour("cat") != GREY
    # Pixels (x, y) from x1..x2-1 and y1..y2-1: the edges only, the inside and outside untouched.
    assert (out[5, 10:30] == colour).all() and (out[24, 10:30] == colour).all()
    assert (out[5:25, 10] == colour).all() and (out[5:25, 29] == colour).all()
    assert (out[6:24, 11:29] == GREY).all()
    assert (out[:5] == GREY).all() and (out[25:] == GREY).all() and (out[:, 30:] == GREY).all()


def test_draw_boxes_scales_clips_and_keeps_the_input():
    image = _grey()
    out = draw_boxes(image, np.array([[-10.0, 2.0, 15.0, 200.0]]), scale=(2.0, 1.0), colour=(255, 0, 0),
                     thickness=1, text=False)
    assert (image == GREY).all()  # a copy was drawn on
    red = (out == (255, 0, 0)).all(axis=2)
    assert red[:, 0].sum() >= 35 and red[:, 29].sum() >= 35  # x scaled by 2: 15 -> 30, clipped at 0
    assert not red[:, 31:].any() and red[39, :30].all()  # bottom clipped to the last row


def test_draw_boxes_draws_only_the_best_scores_with_their_text():
    boxes = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], np.float64)
    out = draw_boxes(_grey(), (boxes, ["a", "b", "c"], np.array([0.1, 0.9, 0.5])), max_boxes=2,
                     thickness=1, text=False)
    drawn = [bool((out[9, x0:x0 + 10] != GREY).any()) for x0 in (0, 20, 40)]
    assert drawn == [False, True, True]
    with_text = draw_boxes(_grey(), (boxes[1:2], ["dog"], np.array([0.87])), text=True)
    assert (with_text != draw_boxes(_grey(), (boxes[1:2], ["dog"], np.array([0.87])), text=False)).any()
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        draw_boxes(_grey(), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="names"):
        draw_boxes(_grey(), (boxes, ["a"], None))


def test_detection_card_draws_on_every_panel_and_captions_the_counts():
    image = _grey(32, 48)
    maps = np.zeros((2, 4, 6), np.float32)
    pred = (np.array([[4.0, 4.0, 20.0, 20.0]]), ["cat"], np.array([0.7]))
    truth = (np.array([[24.0, 8.0, 44.0, 28.0]]), ["dog"], None)
    card = render_detection_card(image, maps, pred_boxes=pred, true_boxes=truth,
                                 label="1 box", pred="1 box")
    plain = render_card(image, maps, pred="1 box, true: 1 box")  # the same caption, no mark
    assert card.shape == plain.shape
    panels = card_geometry(image.shape[:2], 2)["boxes"]
    changed = (card != plain).any(axis=2)
    for x, y, w, h in panels:
        sy, sx = h / 32, w / 48
        # The predicted box's bottom edge and the truth box's left edge, in panel pixels.
        assert (card[y + int(20 * sy) - 1, x + int(8 * sx)] == box_colour("cat")).all()
        assert (card[y + int(16 * sy), x + int(24 * sx)] == TRUTH_BOX_COLOUR).all()
        assert changed[y:y + h, x:x + w].any()
        changed[y:y + h, x:x + w] = False
    assert not changed.any()  # titles and captions as plain: only the panels have boxes


def test_sample_buffer_keeps_boxes_per_sample_with_names():
    buf = SampleBuffer(2, label_mapping={1: "cat", 2: "dog"})
    images = np.zeros((3, 8, 8, 3), np.uint8)
    acts = np.zeros((3, 4, 2, 2), np.float32)
    preds = [{"boxes": np.array([[0, 0, 4, 4], [1, 1, 5, 5]]), "labels": np.array([1, 2]),
              "scores": np.array([0.9, 0.4])},
             {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int64), "scores": np.zeros(0)},
             {"boxes": np.zeros((1, 4)), "labels": np.array([7]), "scores": np.array([0.1])}]
    labels = [{"boxes": [[0, 0, 3, 3]], "labels": [2]}, {"boxes": [], "labels": []},
              {"boxes": [[0, 0, 1, 1]], "labels": [1]}]
    kept = buf.add("eval", None, images, acts, labels, preds)
    assert len(kept) == 2
    assert (kept[0].pred, kept[0].label, kept[0].correct) == ("2 boxes", "1 box", None)
    assert kept[0].pred_boxes.names == ("cat", "dog") and kept[0].label_boxes.names == ("dog",)
    np.testing.assert_array_equal(kept[0].pred_boxes.scores, [0.9, 0.4])
    assert kept[0].label_boxes.scores is None
    assert (kept[1].pred, kept[1].label, len(kept[1].pred_boxes)) == ("0 boxes", "0 boxes", 0)
    with pytest.raises(ValueError, match=r"preds\[0\] has 1 boxes but 2 scores"):
        buf.add("eval", "x", images[:1], acts[:1], None,
                [{"boxes": np.zeros((1, 4)), "scores": np.zeros(2)}])


def test_logger_run_shows_boxes_and_counts(tracking_uri):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, size=(2, 3, 32, 48)).astype(np.float32)
    acts = rng.uniform(0, 1, size=(2, 8, 4, 6)).astype(np.float32)
    preds = [{"boxes": np.array([[2.0, 2.0, 30.0, 20.0]]), "labels": np.array([0]),
              "scores": np.array([0.8])},
             {"boxes": np.array([[1.0, 1.0, 9.0, 9.0], [10, 10, 40, 30]]),
              "labels": np.array([1, 0]), "scores": np.array([0.6, 0.3])}]
    client = MlflowClient()
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_samples=2, label_mapping=["cat", "dog"], strict=True)
        logger.on_batch_end(images, acts, None, preds, mode="eval", ds_id="val")
        logger.on_epoch_end(0)
        assert logger.flush(timeout=60)
        logger.close()
    table = load_json(client, run.info.run_id, "eigencam/eval/val/samples.json")
    cols = table["columns"]
    assert cols[:8] == ["epoch", "sample_index", "sample_id", "label", "prediction", "correct",
                        "n_boxes", "n_true_boxes"]
    rows = [dict(zip(cols, r)) for r in table["data"]]
    assert [(r["prediction"], r["n_boxes"], r["n_true_boxes"]) for r in rows] == [
        ("1 box", 1, None), ("2 boxes", 2, None)]
    card = load_png(client, run.info.run_id,
                    image_series(client, run.info.run_id)["eigencam/eval/val/sample_0"][0])
    # The row records where the panels are; the box's top edge on the input panel, in the
    # class colour of "cat".
    k = sum(c.startswith("evr_") for c in cols)
    assert rows[0]["card"] == card_geometry((32, 48), k) and k >= 1
    assert rows[0]["card"]["size"] == list(card.shape[:2])
    x, y, w, h = rows[0]["card"]["boxes"][0]
    assert (card[y + round(2 * h / 32), x + w // 4] == box_colour("cat")).all()
