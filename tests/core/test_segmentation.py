"""Semantic segmentation without any framework: per-pixel predictions and masks read per
sample, drawn on the card, scored as IoU in the table, and the true mask's foreground used
by ``localization``, in a real MLflow run."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mlflow_eigencam import EigenCAMLogger
from mlflow_eigencam._reader import Reader
from mlflow_eigencam.errors import EigenCAMWarning
from mlflow_eigencam.render import (
    TRUTH_MASK_COLOUR,
    box_colour,
    card_geometry,
    draw_mask,
    render_card,
    render_segmentation_card,
)
from mlflow_eigencam.samples import IGNORE_INDEX, SampleBuffer, mask_iou, segmentation_masks
from tests.helpers.readback import image_series, load_json, load_png

NAMES = ["background", "circle", "square"]
GREY = (90, 90, 90)
H, W = 32, 48  # non-square: (H, W) and (W, H) must not be confused


def _masks():
    """True masks ``(2, H, W)``: a square of class 2 (and a 255 border row), a disc of
    class 1; logits ``(2, 3, H, W)`` that predict the square one pixel off and the disc as
    class 2."""
    true = np.zeros((2, H, W), np.int64)
    true[0, 8:24, 10:30] = 2
    true[0, 0] = IGNORE_INDEX
    yy, xx = np.mgrid[0:H, 0:W]
    true[1][(yy - 16) ** 2 + (xx - 30) ** 2 < 64] = 1
    logits = np.zeros((2, 3, H, W), np.float32)
    logits[:, 0] = 1.0
    logits[0, 2, 9:25, 10:30] = 2.0
    logits[1, 2][true[1] == 1] = 2.0
    return true, logits


def test_segmentation_masks_reads_logits_masks_channels_last_and_ignores():
    true, logits = _masks()
    got = segmentation_masks(logits, (H, W))
    assert got.dtype == np.int32 and got.shape == (2, H, W)
    np.testing.assert_array_equal(got, np.argmax(logits, axis=1))
    np.testing.assert_array_equal(segmentation_masks(np.moveaxis(logits, 1, -1), (H, W)), got)
    labels = segmentation_masks(true, (H, W))
    assert (labels[0, 0] == -1).all() and labels[0, 10, 12] == 2
    binary = segmentation_masks(np.full((1, 1, H, W), 0.7, np.float32), (H, W))
    assert (binary == 1).all()  # one channel of probabilities: class 1 above 0.5
    assert (segmentation_masks(np.full((1, H, W), -2.5), (H, W)) == 0).all()  # a logit
    np.testing.assert_array_equal(segmentation_masks(true[..., None], (H, W)), labels)  # (B, H, W, 1)
    assert segmentation_masks(true, (W, H)) is None  # not the images' size: not per-pixel
    assert segmentation_masks(np.zeros((2, 3)), (H, W)) is None


def test_mask_iou_is_the_mean_over_classes_present_without_ignored_pixels():
    true = np.array([[0, 0, 1, 1], [0, 0, 1, -1]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 2, 2]])
    # Pixel (1, 3) ignored. Class 0: 3 / 4; class 1: 2 / 4; class 2: 0 / 1.
    assert mask_iou(pred, true) == pytest.approx((3 / 4 + 2 / 4 + 0) / 3)
    assert mask_iou(pred, np.full((2, 4), -1)) is None
    assert mask_iou(true.clip(0), true.clip(0)) == 1.0


def test_sample_buffer_keeps_masks_names_and_iou():
    true, logits = _masks()
    buf = SampleBuffer(2, label_mapping=NAMES)
    images = np.zeros((2, H, W, 3), np.uint8)
    kept = buf.add("eval", None, images, np.zeros((2, 4, 4, 6), np.float32), true, logits)
    assert [(s.label, s.pred, s.correct) for s in kept] == [
        ("background, square", "background, square", None),
        ("background, circle", "background, square", None)]
    assert kept[0].iou == pytest.approx(mask_iou(np.argmax(logits[0], 0), np.where(true[0] == 255, -1, true[0])))
    assert kept[1].iou < kept[0].iou
    np.testing.assert_array_equal(kept[1].label_mask.foreground(), true[1] == 1)


def test_a_batch_that_fails_leaves_nothing_in_the_buffer():
    true, logits = _masks()
    buf = SampleBuffer(4, label_mapping=NAMES)
    images = np.zeros((2, H, W, 3), np.uint8)
    acts = np.zeros((2, 4, 4, 6), np.float32)
    with pytest.raises(ValueError, match=r"per-pixel preds must be of the images' size \(H, W\) = \(32, 48\)"):
        buf.add("eval", None, images, acts, true, logits[:, :, :16])
    with pytest.raises(TypeError, match="per-pixel labels must be numbers"):
        buf.add("eval", None, images, acts, true.astype(str), logits)
    assert buf.keys() == [] and buf.room("eval", None) == 4


def test_draw_mask_fills_and_outlines_the_objects_not_the_background():
    classes = np.zeros((20, 30), np.int32)
    classes[5:15, 10:20] = 1
    out = draw_mask(np.full((20, 30, 3), GREY, np.uint8), (classes, {0: "background", 1: "cat"}),
                    thickness=1, fill=0.5)
    colour = np.array(box_colour("cat"))
    assert (out[5, 10:20] == colour).all() and (out[5:15, 19] == colour).all()  # the edge
    inner = np.rint(0.5 * np.array(GREY) + 0.5 * colour)
    assert (out[8, 13] == inner).all()  # the light fill inside
    assert (out[:5] == GREY).all() and (out[:, :10] == GREY).all()  # background untouched
    scaled = draw_mask(np.full((40, 60, 3), GREY, np.uint8), classes, colour=(255, 255, 255))
    assert (scaled[10, 20:40] == 255).all()  # resized to the image, nearest neighbour


def test_segmentation_card_draws_masks_on_the_panels_and_captions_the_iou():
    true, logits = _masks()
    buf = SampleBuffer(1, label_mapping=NAMES)
    s = buf.add("eval", None, np.full((1, H, W, 3), GREY, np.uint8),
                np.zeros((1, 4, 4, 6), np.float32), true[:1], logits[:1])[0]
    maps = np.zeros((2, 4, 6), np.float32)
    card = render_segmentation_card(s.image, maps, pred_mask=s.pred_mask, true_mask=s.label_mask,
                                    iou=s.iou, label=s.label, pred=s.pred, sample_id=s.sample_id)
    plain = render_card(s.image, maps, sample_id=s.sample_id, pred="")
    assert card.shape == plain.shape
    panels = card_geometry((H, W), 2)["boxes"]
    x, y, w, h = panels[0]
    input_panel = card[y:y + h, x:x + w].reshape(-1, 3)
    assert (input_panel == box_colour("square")).all(axis=1).any()  # predicted outline
    assert (input_panel == TRUTH_MASK_COLOUR).all(axis=1).any()  # true outline
    x, y, w, h = panels[1]
    assert (card[y:y + h, x:x + w].reshape(-1, 3) == TRUTH_MASK_COLOUR).all(axis=1).any()
    # Below the panels the caption differs from a plain one (it reads "IoU 0.94 ..."); above
    # them the titles are the same.
    caption_top = panels[-1][1] + h
    assert (card[caption_top:] != plain[caption_top:]).any()
    assert (card[:panels[0][1]] == plain[:panels[0][1]]).all()


def test_logger_run_logs_masks_iou_classes_and_localization_on_the_true_foreground(tracking_uri):
    true, logits = _masks()
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, size=(2, 3, H, W)).astype(np.float32)
    acts = np.zeros((2, 4, 4, 6), np.float32)
    acts[:, :2, 1:3, 1:4] = rng.uniform(1, 2, size=(2, 2, 2, 3))  # a blob: a non-flat map
    client = MlflowClient()
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_samples=2, label_mapping=NAMES, strict=True)
        for epoch in range(2):
            logger.on_batch_end(images, acts, true, logits, mode="eval", ds_id="val")
            logger.on_epoch_end(epoch)
        assert logger.flush(timeout=60)
        logger.close()
    run_id = run.info.run_id
    table = load_json(client, run_id, "eigencam/eval/val/samples.json")
    cols = table["columns"]
    assert cols[:8] == ["epoch", "sample_index", "sample_id", "label", "prediction", "correct",
                        "iou", "classes"]
    rows = [dict(zip(cols, r)) for r in table["data"]]
    assert sorted({r["epoch"] for r in rows}) == [0, 1]
    first = [r for r in rows if r["epoch"] == 0]
    assert [r["classes"] for r in first] == [["background", "square"], ["background", "circle"]]
    assert first[0]["iou"] == pytest.approx(0.9, abs=0.1) and first[1]["iou"] < first[0]["iou"]
    # localization scored against the true foreground (the square, the disc): every row has it.
    assert all(r["localization"] is not None for r in rows)
    history = client.get_metric_history(run_id, "eigencam/eval/val/localization")
    assert [m.step for m in history] == [0, 1]
    # The card: the true outline in white on the input panel.
    card = load_png(client, run_id, image_series(client, run_id)["eigencam/eval/val/sample_0"][1])
    x, y, w, h = first[0]["card"]["boxes"][0]
    assert (card[y:y + h, x:x + w].reshape(-1, 3) == TRUTH_MASK_COLOUR).all(axis=1).any()
    assert first[0]["card"]["size"] == list(card.shape[:2])


def test_logger_keeps_nothing_of_a_batch_whose_masks_are_the_wrong_size(tracking_uri):
    true, logits = _masks()
    images = np.zeros((2, 3, H, W), np.float32)
    logger = EigenCAMLogger(n_samples=2, label_mapping=NAMES)
    with pytest.warns(EigenCAMWarning, match=r"per-pixel labels must be of the images' size"):
        logger.on_batch_end(images, np.zeros((2, 4, 4, 6), np.float32), true[:, :, :20], logits,
                            mode="eval", ds_id="val")
    assert logger.room("eval", "val") == 2
    # A region that fails its check after the samples were taken gives them back too.
    with pytest.warns(EigenCAMWarning, match=r"masks\[0\] must be the image's"):
        logger.on_batch_end(images, np.zeros((2, 4, 4, 6), np.float32), true, logits,
                            mode="eval", ds_id="val", masks=np.zeros((2, 5, 5)))
    assert logger.room("eval", "val") == 2
    logger.close()


def test_streaming_every_sample_keeps_iou_and_classes_in_the_table(tracking_uri):
    true, logits = _masks()
    images = np.zeros((2, 3, H, W), np.float32)
    acts = np.random.default_rng(1).uniform(0, 1, size=(2, 4, 4, 6)).astype(np.float32)
    client = MlflowClient()
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_samples=None, label_mapping=NAMES, strict=True)
        logger.on_batch_end(images, acts, true, logits, mode="eval", ds_id="val")
        logger.on_epoch_end(0)
        assert logger.flush(timeout=60)
        logger.close()
    rows = Reader(client=client).table(run.info.run_id, "eval", "val").rows
    assert [(r["classes"], r["iou"] is not None) for r in rows] == [
        (["background", "square"], True), (["background", "circle"], True)]
