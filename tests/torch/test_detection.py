"""integrations/torch/detection.py: a detector's boxes, and its map cropped to the image's own
cells of the padded canvas (torchvision itself is tested in tests/models)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mlflow_eigencam.integrations.torch.detection import (
    Canvas,
    canvas_of,
    crop_to_images,
    detections,
    transform_of,
)


def test_detections_are_lists_of_dicts_with_boxes():
    out = [{"boxes": torch.zeros(0, 4)}, {"boxes": torch.ones(1, 4), "labels": torch.tensor([1])}]
    assert detections(out) == out and detections(tuple(out)) == out
    assert detections([]) is None and detections(torch.zeros(2, 3)) is None
    assert detections([{"labels": torch.tensor([1])}]) is None


def test_canvas_of_reads_an_image_list_and_ignores_anything_else():
    image_list = SimpleNamespace(image_sizes=[(20, 30), (24, 32)], tensors=torch.zeros(2, 3, 32, 48))
    canvas = canvas_of((image_list, None))  # what GeneralizedRCNNTransform returns
    assert canvas == Canvas(height=32, width=48, image_sizes=[(20, 30), (24, 32)])
    assert canvas_of(torch.zeros(2, 3, 32, 48)) is None
    assert canvas_of(SimpleNamespace(image_sizes=[("a", 1)], tensors=torch.zeros(1, 3, 8, 8))) is None


def test_transform_of_is_a_detectors_transform_module_only():
    model = nn.Module()
    assert transform_of(model) is None
    model.transform = nn.Identity()
    assert transform_of(model) is model.transform


def test_the_map_is_cropped_to_the_cells_over_the_image():
    canvas = Canvas(height=32, width=48, image_sizes=[(20, 30)])
    grid = torch.arange(24, dtype=torch.float32).reshape(1, 1, 4, 6)  # stride 8
    # ceil(20 * 4 / 32) = 3 rows, ceil(30 * 6 / 48) = 4 columns.
    assert canvas.cells((4, 6), 0) == (3, 4) and canvas.cells((4, 6), 1) is None
    cropped, extent = crop_to_images(grid, canvas)
    assert torch.equal(cropped, grid[:, :, :3, :4])
    assert extent == pytest.approx((20 * 4 / (3 * 32), 30 * 6 / (4 * 48)))


def test_a_map_of_another_geometry_or_no_canvas_is_left_whole():
    canvas = Canvas(height=32, width=48, image_sizes=[(20, 30)])
    grid = torch.rand(1, 2, 2, 12)  # no single stride maps 32x48 to 2x12
    assert crop_to_images(grid, canvas) == (grid, None)
    assert crop_to_images(grid, None) == (grid, None)
    full = Canvas(height=32, width=48, image_sizes=[(32, 48)])
    cropped, extent = crop_to_images(torch.rand(1, 2, 4, 6), full)
    assert cropped.shape == (1, 2, 4, 6) and extent is None
