"""integrations/torch/batches.py: batches -> (images, labels), and tensors -> numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlflow_eigencam.integrations.torch.batches import images_as_batch, to_numpy
from mlflow_eigencam.pytorch import default_batch_to_xy


def test_default_batch_to_xy_forms():
    x, y = torch.rand(2, 3, 4, 4), torch.tensor([0, 1])
    assert default_batch_to_xy((x, y))[1] is y
    assert default_batch_to_xy([x])[1] is None
    assert default_batch_to_xy(x)[0] is x
    assert default_batch_to_xy({"input": x, "target": y})[1] is y
    with pytest.raises(TypeError, match="batch_to_xy"):
        default_batch_to_xy({"pixels": x})
    with pytest.raises(TypeError, match=r"\(2,\) tensor"):
        default_batch_to_xy((y, x))


def test_default_batch_to_xy_takes_a_detection_batch():
    g = torch.Generator().manual_seed(0)
    images = tuple(torch.rand(3, 32, 48, generator=g) for _ in range(2))
    targets = tuple({"boxes": torch.tensor([[1.0, 1.0, 30.0, 30.0]]), "labels": torch.ones(1, dtype=torch.int64)}
                    for _ in range(2))
    x, y = default_batch_to_xy((images, targets))
    assert x is images and y is targets


def test_images_as_batch_stacks_a_list_and_names_bad_shapes():
    images = [torch.rand(3, 8, 12), torch.rand(3, 8, 12)]
    batch, as_list = images_as_batch(images)
    assert as_list and batch.shape == (2, 3, 8, 12) and torch.equal(batch[1], images[1])
    batch, as_list = images_as_batch(np.zeros((2, 8, 8), np.float32))
    assert not as_list and batch.shape == (2, 8, 8)
    with pytest.raises(ValueError, match=r"one size.*\(3, 8, 8\)"):
        images_as_batch([torch.rand(3, 8, 8), torch.rand(3, 8, 12)])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*\(2, 3\)"):
        images_as_batch(torch.rand(2, 3))


def test_to_numpy_slices_detaches_and_widens_half_precision():
    logits = torch.rand(4, 3, requires_grad=True).half()
    out = to_numpy(logits, 2)
    assert isinstance(out, np.ndarray) and out.shape == (2, 3) and out.dtype == np.float32
    assert to_numpy(None, 2) is None
    assert to_numpy(["a", "b", "c"], 2) == ["a", "b"]
    np.testing.assert_array_equal(to_numpy(np.arange(5), 3), [0, 1, 2])
    boxes = [{"boxes": torch.ones(2, 4), "labels": torch.tensor([1, 2]), "note": "x"}] * 3
    dets = to_numpy(boxes, 2)
    assert len(dets) == 2 and isinstance(dets[0]["boxes"], np.ndarray) and dets[0]["note"] == "x"
    assert dets[0]["boxes"].shape == (2, 4)  # every box of an image, not the first k
