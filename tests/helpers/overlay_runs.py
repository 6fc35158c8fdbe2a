"""A small detector run for the overlay tests (numpy only): fixed images, boxes, maps.

Each image holds one bright shape; its true box is the shape's, the predicted box is the
same box shifted by a few pixels, with a score. The activations come from
``logger_run.activations_at`` (an 8 x 8 grid, 16 channels), so components differ.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from tests.helpers.logger_run import CLASSES, activations_at, make_eval_set

#: Samples and epochs the overlay tests log.
N_SAMPLES, EPOCHS, K = 3, 2, 3


def detections(masks: np.ndarray, labels: np.ndarray) -> Tuple[List[Dict], List[Dict]]:
    """(true, predicted) detections of the masks' shapes: one box each, the prediction
    shifted by 3 px with a score."""
    truth, preds = [], []
    for mask, label in zip(masks, labels):
        ys, xs = np.nonzero(mask)
        box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=np.float64)
        truth.append({"boxes": box, "labels": np.array([label])})
        preds.append({"boxes": box + 3, "labels": np.array([label]), "scores": np.array([0.9])})
    return truth, preds


def log_detector_run(logger, epochs: int = EPOCHS, n: int = N_SAMPLES, size: int = 64,
                     start: int = 0) -> np.ndarray:
    """Offer epochs ``start`` .. ``start + epochs - 1`` of a detector's eval batch to
    ``logger``; returns the uint8 (n, size, size, 3) images as the logger keeps them."""
    images, labels, masks = make_eval_set(n=n, size=size, seed=0)
    truth, preds = detections(masks, labels)
    for epoch in range(start, start + epochs):
        logger.on_batch_end(images, activations_at(epoch, masks), truth, preds, mode="eval",
                            ds_id="val")
        logger.on_epoch_end(epoch)
    return np.rint(images.transpose(0, 2, 3, 1) * 255).astype(np.uint8)


__all__ = ["CLASSES", "EPOCHS", "K", "N_SAMPLES", "detections", "log_detector_run"]
