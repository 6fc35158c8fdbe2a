"""torchvision detectors at random init: the backbone's last stage by default, boxes drawn
with class names and scores, box counts in the caption and the table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from mlflow_eigencam.render import box_colour, render_card, render_detection_card, to_rgb_uint8
from tests.helpers.readback import load_png
from tests.helpers.zoo import (
    assert_state_unchanged,
    assert_strip_close,
    check_logged_epochs,
    explained_tensor,
    plain_svd,
    rows_by_epoch,
    run_two_epochs,
    state_of,
)

tvd = pytest.importorskip("torchvision.models.detection")

NAMES = ["background", "cat", "dog", "bird"]
PER_IMAGE = 6  # detections kept per image; score thresholds at 0 so random weights give some


def _retinanet_resnet18():
    import torchvision
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    backbone = _resnet_fpn_extractor(torchvision.models.resnet18(weights=None), 5,
                                     returned_layers=[2, 3, 4],
                                     extra_blocks=LastLevelP6P7(256, 256))
    return tvd.RetinaNet(backbone, num_classes=len(NAMES), min_size=96, max_size=128,
                         score_thresh=0.0, detections_per_img=PER_IMAGE, topk_candidates=16)


def _fasterrcnn_mobilenet():
    return tvd.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=len(NAMES), min_size=96, max_size=128,
        box_score_thresh=0.0, box_detections_per_img=PER_IMAGE)


def _ssdlite():
    return tvd.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=len(NAMES), score_thresh=0.0,
        detections_per_img=PER_IMAGE, topk_candidates=16)


CASES = [
    ("retinanet_resnet18_fpn", _retinanet_resnet18,
     "backbone.body.layer4 (auto: feature map (B, 512, 3, 4), last feature map of the "
     "detection backbone)"),
    ("fasterrcnn_mobilenet_v3_large_fpn", _fasterrcnn_mobilenet,
     "backbone.body.16 (auto: feature map (B, 960, 3, 4), last feature map of the "
     "detection backbone)"),
    # No FPN body: the backbone's feature extractor (stride 32 on the 320x320 canvas), not the
    # extra prediction levels after it (down to 1x1).
    ("ssdlite320_mobilenet_v3_large", _ssdlite,
     "backbone.features.1 (auto: feature map (B, 480, 10, 10), last feature map of the "
     "detection backbone, not its extras)"),
]


@pytest.mark.parametrize("factory, expected_tag", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_detector_boxes_counts_and_default_layer(tracking_uri, factory, expected_tag):
    torch.manual_seed(0)
    model = factory()
    images = [torch.rand(3, 96, 128) for _ in range(2)]  # a detector takes a list of images
    targets = [
        {"boxes": torch.tensor([[8.0, 10.0, 60.0, 70.0], [70.0, 20.0, 120.0, 90.0]]),
         "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[30.0, 30.0, 90.0, 80.0]]), "labels": torch.tensor([3])},
    ]
    before = state_of(model)
    monitor = run_two_epochs(model, images, model, labels=targets, n_samples=2,
                             label_mapping=NAMES)
    assert_state_unchanged(before, model)
    assert monitor.target_layer_tag == expected_tag
    client = MlflowClient()
    tag, by_epoch, act = check_logged_epochs(client, monitor, model, images, 2)

    model.eval()
    with torch.no_grad():
        detections = model(images)
    model.train()
    maps, _ = plain_svd(act)
    for i, row in enumerate(by_epoch[0]):
        n_true = len(targets[i]["boxes"])
        assert row["label"] == ("1 box" if n_true == 1 else f"{n_true} boxes")
        assert row["prediction"] == f"{PER_IMAGE} boxes"
        assert (row["n_boxes"], row["n_true_boxes"], row["correct"]) == (PER_IMAGE, n_true, None)
        det = detections[i]
        pred = (det["boxes"].numpy(), [NAMES[int(v)] for v in det["labels"]], det["scores"].numpy())
        truth = (targets[i]["boxes"].numpy(), [NAMES[int(v)] for v in targets[i]["labels"]], None)
        image = to_rgb_uint8(images[i].numpy(), "CHW")
        evr = [row[f"evr_{c}"] for c in (1, 2, 3)]
        kwargs = dict(explained_variance=evr, label=row["label"], pred=row["prediction"],
                      sample_id=row["sample_id"])
        expected = render_detection_card(image, maps[i], pred_boxes=pred, true_boxes=truth, **kwargs)
        assert_strip_close(client, monitor.run_id, row, expected)
        # The boxes are there: in the colours of their class names, where no box was drawn.
        plain = render_card(image, maps[i], **kwargs)
        changed = np.any(expected != plain, axis=2)
        colours = {box_colour(name) for name in pred[1]} | {(255, 255, 255)}
        assert changed.mean() > 0.005
        assert any(np.all(expected[changed] == np.array(c), axis=1).any() for c in colours)


@pytest.mark.parametrize("layer, cells", [("backbone.body.layer2", (10, 16)), (None, (3, 4))],
                         ids=["layer2-stride8", "default-layer4-stride32"])
def test_detector_map_covers_the_image_not_the_padding(tracking_uri, layer, cells):
    """A 60x100 image is resized to 76x128 and padded to 96x128 (a multiple of 32): the
    backbone's map covers the padded canvas. The logged maps are a plain SVD of each image's
    own cells, ceil(76 / stride) x ceil(128 / stride), top left (stride 8: 10 of 12 rows;
    stride 32: 3 of 3), drawn so that the cells keep their size on the image: the last row,
    76 - 9 * 8 = 4 of 8 (stride 32: 12 of 32) pixels image, is cut at the image's edge."""
    torch.manual_seed(0)
    model = _retinanet_resnet18()
    images = [torch.rand(3, 60, 100) for _ in range(2)]
    before = state_of(model)
    monitor = run_two_epochs(model, images, model, target_layer=layer, n_samples=2,
                             label_mapping=NAMES)
    assert_state_unchanged(before, model)
    client = MlflowClient()
    by_epoch = rows_by_epoch(client, monitor.run_id)
    assert sorted(by_epoch) == [0, 1]

    full = explained_tensor(model, monitor.target_layer_tag, images)
    stride = 8 if layer else 32
    assert full.shape[2:] == (96 // stride, 128 // stride)  # the padded 96x128 canvas
    rows, cols = cells
    maps, ratios = plain_svd(full[:, :, :rows, :cols])
    logged = np.array([[r[f"evr_{c}"] for c in (1, 2, 3)] for r in by_epoch[0]])
    np.testing.assert_allclose(logged, ratios, atol=2e-5)
    extent = (76 / (rows * stride), 1.0)  # the image's share of the kept cells

    model.eval()
    with torch.no_grad():
        detections = model(images)
    model.train()
    for i, row in enumerate(by_epoch[0]):
        for later in by_epoch[1]:  # the same images, the same strip at the next epoch
            if later["sample_id"] == row["sample_id"]:
                np.testing.assert_array_equal(load_png(client, monitor.run_id, row["image"]),
                                              load_png(client, monitor.run_id, later["image"]))
        det = detections[i]
        pred = (det["boxes"].numpy(), [NAMES[int(v)] for v in det["labels"]], det["scores"].numpy())
        image = to_rgb_uint8(images[i].numpy(), "CHW")
        kwargs = dict(explained_variance=list(logged[i]), label=row["label"],
                      pred=row["prediction"], sample_id=row["sample_id"], pred_boxes=pred)
        expected = render_detection_card(image, maps[i], map_extent=extent, **kwargs)
        assert_strip_close(client, monitor.run_id, row, expected)
        # Stretching the kept cells over the image, or the whole padded map, draws otherwise.
        padded_maps, _ = plain_svd(full[i:i + 1])
        for other in (render_detection_card(image, maps[i], **kwargs),
                      render_detection_card(image, padded_maps[0], **kwargs)):
            assert np.abs(other.astype(int) - expected).max(axis=2).astype(bool).mean() > 0.02


def test_ssd300_vgg16_default_layer_is_the_feature_extractor_not_its_extras():
    from mlflow_eigencam.pytorch import find_target_layer

    model = tvd.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=len(NAMES))
    name, module = find_target_layer(model, [torch.rand(3, 96, 128)])
    assert (name, module) == ("backbone.features", model.backbone.features)
