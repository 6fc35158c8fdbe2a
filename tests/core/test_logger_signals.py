"""EigenCAMLogger's per-epoch explanation signals (docs/signals.md) in a real MLflow run:
``localization`` / ``pointing_game`` from true boxes or masks, ``faithfulness`` handed in per
sample; table columns and mean metrics. The scores themselves: tests/core/test_metrics.py."""

from __future__ import annotations

import warnings

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mlflow_eigencam import EigenCAMLogger
from mlflow_eigencam.errors import EigenCAMWarning
from tests.helpers.readback import load_json, metric_steps

SIZE, GRID = 32, 8  # image pixels, map cells (4 px per cell)


def _batch(n=4, seed=0):
    """Images with one bright square each and activations that fire on exactly its cells.

    Returns:
        images float32 (n, 3, 32, 32), activations (n, 6, 8, 8), labels (n,), logits
        (n, 2), boxes [(1, 4)] on the square, far boxes [(1, 4)] in the opposite corner.
    """
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 0.2, size=(n, 3, SIZE, SIZE)).astype(np.float32)
    acts = rng.normal(0, 0.01, size=(n, 6, GRID, GRID)).astype(np.float32)
    boxes, far = [], []
    for i in range(n):
        cy, cx = (int(v) for v in rng.integers(0, 3, size=2))  # top-left quarter of the map
        images[i, :, 4 * cy:4 * cy + 12, 4 * cx:4 * cx + 12] = 0.9
        acts[i, :, cy:cy + 3, cx:cx + 3] += rng.uniform(1, 2, size=(6, 1, 1))
        boxes.append(np.array([[4 * cx, 4 * cy, 4 * cx + 12, 4 * cy + 12]]))
        far.append(np.array([[20, 20, 32, 32]]))
    labels = np.arange(n) % 2
    return images, acts, labels, np.eye(2)[labels], boxes, far


def _rows(client, rid, path):
    table = load_json(client, rid, path)
    return table["columns"], [dict(zip(table["columns"], r)) for r in table["data"]]


def test_true_boxes_give_localization_and_pointing_columns_and_metrics(tracking_uri):
    client = MlflowClient()
    images, acts, labels, logits, boxes, far = _batch()
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_components=2, n_samples=4)
        for epoch, true in enumerate((boxes, far)):
            logger.on_batch_end(images[:2], acts[:2], labels[:2], logits[:2], boxes=true[:2],
                                faithfulness=[0.5, None], mode="eval", ds_id="val")
            logger.on_batch_end(images[2:], acts[2:], labels[2:], logits[2:], boxes=true[2:],
                                faithfulness=np.array([0.25, np.nan]), mode="eval", ds_id="val")
            logger.on_epoch_end(epoch)
        logger.close()
    rid = run.info.run_id
    cols, rows = _rows(client, rid, "eigencam/eval/val/samples.json")
    assert cols[cols.index("map_change") + 1:] == ["localization", "pointing_game", "faithfulness",
                                                   "fixation", "overlay", "card", "image"]
    on_box, off_box = rows[:4], rows[4:]
    assert all(r["localization"] > 0.8 and r["pointing_game"] == 1.0 for r in on_box)
    assert all(r["localization"] < 0.05 and r["pointing_game"] == 0.0 for r in off_box)
    assert [r["faithfulness"] for r in on_box] == [0.5, None, 0.25, None]
    loc = metric_steps(client, rid, "eigencam/eval/val/localization")
    assert [s for s, _ in loc] == [0, 1] and loc[0][1] > 0.8 and loc[1][1] < 0.05
    assert metric_steps(client, rid, "eigencam/eval/val/pointing_game") == [(0, 1.0), (1, 0.0)]
    faith = metric_steps(client, rid, "eigencam/eval/val/faithfulness")
    assert [s for s, _ in faith] == [0, 1] and faith[0][1] == pytest.approx(0.375)


def test_masks_in_streaming_mode_and_no_columns_without_signals(tracking_uri):
    client = MlflowClient()
    images, acts, labels, logits, boxes, _ = _batch()
    masks = np.zeros((4, SIZE, SIZE), bool)
    for i, b in enumerate(boxes):
        x1, y1, x2, y2 = b[0].astype(int)
        masks[i, y1:y2, x1:x2] = True
    with mlflow.start_run() as run:
        streaming = EigenCAMLogger(n_samples=None, n_components=1)
        streaming.on_batch_end(images, acts, labels, logits, masks=masks, mode="eval")
        streaming.on_epoch_end(0)
        streaming.close()
    with mlflow.start_run() as plain_run:
        plain = EigenCAMLogger(n_samples=4, n_components=1)
        plain.on_batch_end(images, acts, labels, logits, mode="eval")
        plain.on_epoch_end(0)
        plain.close()
    (part,) = [f.path for f in client.list_artifacts(run.info.run_id, "eigencam/eval/all/table")]
    cols, rows = _rows(client, run.info.run_id, part)
    assert "localization" in cols and "faithfulness" not in cols
    assert all(r["localization"] > 0.8 and r["pointing_game"] == 1.0 for r in rows)
    assert metric_steps(client, run.info.run_id, "eigencam/eval/all/pointing_game") == [(0, 1.0)]
    cols, _ = _rows(client, plain_run.info.run_id, "eigencam/eval/all/samples.json")
    assert not set(cols) & {"localization", "pointing_game", "faithfulness"}
    assert "fixation" in cols  # label-free: always there
    keys = client.get_run(plain_run.info.run_id).data.metrics
    assert not any(k.rsplit("/", 1)[-1] in ("localization", "faithfulness") for k in keys)


def test_bad_boxes_or_masks_name_the_value(tracking_uri):
    images, acts, labels, logits, boxes, _ = _batch()
    with mlflow.start_run():
        strict = EigenCAMLogger(n_samples=4, strict=True)
        with pytest.raises(ValueError, match="boxes have 3 entries but the batch has 4"):
            strict.on_batch_end(images, acts, labels, logits, boxes=boxes[:3], mode="eval")
        with pytest.raises(ValueError, match=r"masks\[0\] must be the image's \(H, W\) = \(32, 32\)"):
            strict.on_batch_end(images, acts, labels, logits, masks=np.ones((4, 8, 8)), mode="eval")
        strict.close()


def test_fixation_stable_epoch_and_one_alarm_for_maps_on_one_corner(tracking_uri, caplog):
    """Every map on the same corner cell (a watermark), labels right: fixation near 1 as a
    column and a metric, one warning and one alarm tag naming epoch, signal and samples; the
    same maps every epoch make the run stable from epoch 0. Moving maps raise nothing."""
    client = MlflowClient()
    images, acts, labels, logits, _, _ = _batch(n=4)
    corner = np.random.default_rng(1).normal(0, 0.01, size=acts.shape).astype(np.float32)
    corner[:, :, 0, 0] += 2.0
    with mlflow.start_run() as run, pytest.warns(EigenCAMWarning) as caught:
        logger = EigenCAMLogger(n_components=1, n_samples=4)
        for epoch in range(3):
            logger.on_batch_end(images, corner, labels, logits, mode="eval", ds_id="val")
            logger.on_epoch_end(epoch)
        logger.close()
    alarms = [w for w in caught if "alarm" in str(w.message)]
    assert len(alarms) == 1 and "epoch 0: fixation" in str(alarms[0].message)
    rid = run.info.run_id
    _, rows = _rows(client, rid, "eigencam/eval/val/samples.json")
    assert all(r["fixation"] > 0.95 for r in rows)
    fix = metric_steps(client, rid, "eigencam/eval/val/fixation")
    assert [s for s, _ in fix] == [0, 1, 2] and min(v for _, v in fix) > 0.95
    tags = client.get_run(rid).data.tags
    assert tags["mlflow_eigencam.stable_epoch"] == "0"
    ids = ", ".join(r["sample_id"] for r in rows[:4])
    assert tags["mlflow_eigencam.alarm"] == (f"epoch 0: fixation {fix[0][1]:.2f} >= 0.8 on "
                                             f"mode='eval' ds_id='val' (samples: {ids})")
    moving = np.random.default_rng(2).normal(0, 0.01, size=acts.shape).astype(np.float32)
    for i, (r, c) in enumerate(((0, 0), (0, 7), (7, 0), (7, 7))):
        moving[i, :, r, c] += 2.0
    with mlflow.start_run() as quiet, warnings.catch_warnings():
        warnings.simplefilter("error", EigenCAMWarning)
        logger = EigenCAMLogger(n_components=1, n_samples=4)
        logger.on_batch_end(images, moving, labels, logits, mode="eval", ds_id="val")
        logger.on_epoch_end(0)
        logger.close()
    tags = client.get_run(quiet.info.run_id).data.tags
    assert "mlflow_eigencam.alarm" not in tags and "mlflow_eigencam.stable_epoch" not in tags
    assert metric_steps(client, quiet.info.run_id, "eigencam/eval/val/fixation")[0][1] < 0.1
