"""torchvision segmenters at random init: the backbone's last stage by default, every epoch
logged with the predicted and true masks on the card, the masks' IoU and classes in the
table, maps and ratios those of a plain per-sample SVD; and a batch the logger cannot take
is never pinned."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from mlflow_eigencam.errors import EigenCAMWarning
from mlflow_eigencam.pytorch import EigenCAMMonitor
from mlflow_eigencam.render import TRUTH_MASK_COLOUR, box_colour, render_segmentation_card, to_rgb_uint8
from mlflow_eigencam.samples import IGNORE_INDEX, mask_iou, sample_id
from tests.helpers.readback import load_png, metric_steps
from tests.helpers.zoo import (
    assert_state_unchanged,
    assert_strip_close,
    explained_tensor,
    plain_svd,
    rows_by_epoch,
    state_of,
)

seg = pytest.importorskip("torchvision.models.segmentation")

NAMES = ["background", "square", "disc"]
H, W = 64, 96
EPOCHS = 3


def _shapes(n: int = 2):
    """Images with a bright square (class 1) and a dark disc (class 2), their masks (int64,
    the top row ``IGNORE_INDEX``)."""
    g = torch.Generator().manual_seed(0)
    images = 0.4 + 0.1 * torch.rand(n, 3, H, W, generator=g)
    masks = torch.zeros(n, H, W, dtype=torch.int64)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    for i in range(n):
        top, left = 8 + 6 * i, 10 + 8 * i
        images[i, :, top:top + 24, left:left + 24] = 0.95
        masks[i, top:top + 24, left:left + 24] = 1
        disc = (yy - 40) ** 2 + (xx - 70 + 4 * i) ** 2 < 12 ** 2
        images[i, :, disc] = 0.05
        masks[i, disc] = 2
    masks[:, 0] = IGNORE_INDEX
    return images, masks


CASES = [
    # aux_loss: the output is {"out", "aux"}; "out" is the prediction.
    ("deeplabv3_mobilenet_v3_large",
     lambda: seg.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                              num_classes=len(NAMES), aux_loss=True),
     r"backbone\.16 \(auto: feature map \(B, 960, 4, 6\), last feature map of the backbone"),
    ("lraspp_mobilenet_v3_large",
     lambda: seg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                           num_classes=len(NAMES)),
     r"backbone\.16 \(auto: feature map \(B, 960, 4, 6\), last feature map of the backbone"),
]


@pytest.mark.parametrize("factory, tag_pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_segmenter_logs_every_epoch_with_masks_iou_and_classes(tracking_uri, factory, tag_pattern):
    torch.manual_seed(0)
    model = factory()
    model.train()
    images, masks = _shapes()
    before = state_of(model)
    monitor = EigenCAMMonitor(model, n_samples=2, label_mapping=NAMES)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EigenCAMWarning)  # no epoch may be lost
        for epoch in range(EPOCHS):
            model.eval()
            with torch.no_grad(), monitor.capture("eval", "val"):
                out = model(images)
                monitor.update(images, masks, out)  # the dict: read as its "out"
            monitor.epoch_end(epoch)
            model.train()
        assert monitor.close() == 0
    assert_state_unchanged(before, model)
    tag = monitor.target_layer_tag
    assert re.match(tag_pattern, tag), tag

    client = MlflowClient()
    run_id = monitor.run_id
    by_epoch = rows_by_epoch(client, run_id)
    assert sorted(by_epoch) == list(range(EPOCHS)) and all(len(v) == 2 for v in by_epoch.values())
    assert [s for s, _ in metric_steps(client, run_id, "eigencam/eval/val/localization")] == \
        list(range(EPOCHS))

    model.eval()
    with torch.no_grad():
        pred = model(images)["out"].argmax(1).numpy()
    model.train()
    true = np.where(masks.numpy() == IGNORE_INDEX, -1, masks.numpy())
    act = explained_tensor(model, tag, images)
    maps, ratios = plain_svd(act)
    for rows in by_epoch.values():
        logged = np.array([[r[f"evr_{c}"] for c in (1, 2, 3)] for r in rows])
        np.testing.assert_allclose(logged, ratios, atol=2e-5)
        for i, row in enumerate(rows):
            assert row["classes"] == NAMES and row["label"] == ", ".join(NAMES)
            assert row["correct"] is None and row["localization"] is not None
            assert row["iou"] == pytest.approx(mask_iou(pred[i], true[i]), abs=1e-6)
    for i, row in enumerate(by_epoch[EPOCHS - 1]):  # the pinned pass's cards
        image = to_rgb_uint8(images[i].numpy(), "CHW")
        names = dict(enumerate(NAMES))
        expected = render_segmentation_card(
            image, maps[i], pred_mask=(pred[i], names), true_mask=(true[i], names),
            iou=row["iou"], label=row["label"], pred=row["prediction"], sample_id=row["sample_id"],
            explained_variance=[row[f"evr_{c}"] for c in (1, 2, 3)])
        assert_strip_close(client, run_id, row, expected)
        card = load_png(client, run_id, row["image"])
        x, y, w, h = row["card"]["boxes"][0]
        panel = card[y:y + h, x:x + w].reshape(-1, 3)
        assert (panel == TRUTH_MASK_COLOUR).all(axis=1).sum() > 100  # the true outlines
        # A predicted class with an edge inside the image is outlined in its colour (random
        # weights may predict one class everywhere: then it has no edge, only the fill).
        for c in np.unique(pred[i]):
            if c != 0 and 0 < (pred[i] == c).mean() < 1:
                assert (panel == box_colour(NAMES[c])).all(axis=1).any(), NAMES[c]


class TinySegmenter(nn.Module):
    """Two convolutions and a 1x1 classifier, upsampled to the input: ``(B, K, H, W)``."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(16, n_classes, 1)

    def forward(self, x: torch.Tensor) -> dict:
        logits = self.classifier(self.features(x))
        return {"out": nn.functional.interpolate(logits, size=x.shape[-2:], mode="nearest")}


def test_a_batch_the_logger_cannot_take_is_never_pinned(tracking_uri):
    """Masks of the wrong size: the logger warns and keeps nothing; the monitor pins nothing
    of that batch, takes the next one, and re-runs only that one at later epochs."""
    torch.manual_seed(0)
    model = TinySegmenter()
    images, masks = _shapes(4)
    monitor = EigenCAMMonitor(model, n_samples=2, label_mapping=NAMES, faithfulness=False)
    with torch.no_grad():
        with monitor.capture("eval", "val"):
            with pytest.warns(EigenCAMWarning, match=r"per-pixel labels must be of the images' size"):
                monitor.update(images[:2], masks[:2, :32], model(images[:2]))
        with monitor.capture("eval", "val"):
            monitor.update(images[2:], masks[2:], model(images[2:]))
    monitor.epoch_end(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EigenCAMWarning)
        for epoch in (1, 2):
            with monitor.capture("eval", "val"):
                pass  # pinned: nothing per batch; the epoch end re-runs the pinned inputs
            monitor.epoch_end(epoch)
    monitor.close()
    by_epoch = rows_by_epoch(MlflowClient(), monitor.run_id)
    assert sorted(by_epoch) == [0, 1, 2]
    ids = [[r["sample_id"] for r in rows] for rows in by_epoch.values()]
    expected = [to_rgb_uint8(im.numpy(), "CHW") for im in images[2:]]
    assert ids == [[sample_id(e) for e in expected]] * 3
