"""The synthetic shapes helper shared by examples, tests and benchmarks (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.torch_models import make_shapes


def test_seeded_layouts_and_ranges():
    a, la, ba = make_shapes(12, 24, seed=3)
    b, lb, bb = make_shapes(12, 24, seed=3, layout="NHWC")
    assert a.shape == (12, 3, 24, 24) and a.dtype == np.float32
    assert b.shape == (12, 24, 24, 3)
    np.testing.assert_array_equal(a, b.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(ba, bb)
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert set(la) <= {0, 1, 2} and la.dtype == np.int64
    c, _, _ = make_shapes(12, 24, seed=4)
    assert not np.array_equal(a, c)


def test_boxes_hold_the_shape_non_square():
    images, labels, boxes = make_shapes(20, (24, 40), n_classes=4, seed=1, layout="NHWC")
    assert images.shape == (20, 24, 40, 3)
    for img, (x0, y0, x1, y1) in zip(images, boxes):
        assert 0 <= x0 < x1 <= 40 and 0 <= y0 < y1 <= 24
        inside = img[y0:y1, x0:x1].mean()
        outside = np.concatenate([img[:y0].reshape(-1, 3), img[y1:].reshape(-1, 3)]).mean() \
            if (y0 > 0 or y1 < 24) else img[:, :x0].mean()
        assert inside > outside  # the shape is brighter than the background


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(size=4), dict(n_classes=5), dict(layout="CHW"),
                                    dict(min_frac=0.8, max_frac=0.5)])
def test_bad_arguments(kwargs):
    args = dict(n=4, size=16)
    args.update(kwargs)
    with pytest.raises(ValueError):
        make_shapes(args.pop("n"), **args)
