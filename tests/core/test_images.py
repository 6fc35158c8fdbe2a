"""Image normalisation (``mlflow_eigencam.images``): layouts, dtypes and ranges, checked on pixels."""

import numpy as np
import pytest

from mlflow_eigencam.images import to_rgb_uint8


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_hwc_uint8_is_copied_unchanged():
    img = rgb(5, 7)
    out = to_rgb_uint8(img)
    np.testing.assert_array_equal(out, img)
    assert not np.shares_memory(out, img) and out.flags.c_contiguous


def test_chw_grey_and_rgba():
    img = rgb(5, 7)
    np.testing.assert_array_equal(to_rgb_uint8(np.moveaxis(img, -1, 0)), img)
    grey = img[:, :, 0]
    expected = np.repeat(grey[:, :, None], 3, axis=2)
    for g in (grey, grey[:, :, None], grey[None]):
        np.testing.assert_array_equal(to_rgb_uint8(g), expected)
    rgba = np.concatenate([img, np.full((5, 7, 1), 9, np.uint8)], axis=2)
    np.testing.assert_array_equal(to_rgb_uint8(rgba), img)
    np.testing.assert_array_equal(to_rgb_uint8(np.moveaxis(rgba, -1, 0)), img)


def test_float_ranges():
    x = np.array([[0.0, 0.5, 1.0]], np.float32)
    assert to_rgb_uint8(x)[0, :, 0].tolist() == [0, 128, 255]  # [0, 1] scaled, not stretched
    assert to_rgb_uint8(x * 0.5)[0, :, 0].tolist() == [0, 64, 128]
    assert to_rgb_uint8(np.array([[-1.0, 0.0, 3.0]]))[0, :, 0].tolist() == [0, 64, 255]  # min-max
    assert to_rgb_uint8(np.array([[-2.0, np.nan, 2.0]]))[0, :, 0].tolist() == [0, 128, 255]  # NaN -> 0
    assert to_rgb_uint8(np.full((2, 2), 7.0)).max() == 0  # flat out of range: black, no NaN
    assert to_rgb_uint8(np.array([[0, 1000]], np.uint16))[0, :, 0].tolist() == [0, 255]
    assert to_rgb_uint8(np.array([[0, 200]], np.int64))[0, :, 0].tolist() == [0, 200]
    assert to_rgb_uint8(np.array([[False, True]]))[0, :, 0].tolist() == [0, 255]


def test_ambiguous_layout_needs_a_hint():
    img = rgb(3, 4)  # (3, 4, 3): HWC or CHW
    with pytest.raises(ValueError, match=r"\(3, 4, 3\).*layout='HWC' or layout='CHW'"):
        to_rgb_uint8(img)
    np.testing.assert_array_equal(to_rgb_uint8(img, "HWC"), img)
    assert to_rgb_uint8(img, "chw").shape == (4, 3, 3)


@pytest.mark.parametrize("shape", [(5, 6, 7), (2, 5, 6, 3), (7,)])
def test_shapes_that_are_not_images(shape):
    with pytest.raises(ValueError, match=str(shape).replace("(", r"\(").replace(")", r"\)")):
        to_rgb_uint8(np.zeros(shape, np.uint8))


def test_bad_layout_and_channel_count():
    with pytest.raises(ValueError, match="layout must be 'HWC', 'CHW' or None, got 'NHWC'"):
        to_rgb_uint8(rgb(4, 4), "NHWC")
    with pytest.raises(ValueError, match="has 2 channels"):
        to_rgb_uint8(np.zeros((4, 4, 2), np.uint8), "HWC")
