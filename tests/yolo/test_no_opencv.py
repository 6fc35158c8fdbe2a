"""The package has no OpenCV dependency; where OpenCV is installed anyway (Ultralytics brings
``opencv-python``), the package's own resize, blur and colormaps equal OpenCV's, and the
environment stays consistent (``pip check``)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from mlflow_eigencam.images import gaussian_blur, resize_bilinear  # noqa: E402
from mlflow_eigencam.render.heat import COLORMAPS, _colormap_rgb  # noqa: E402


def test_package_requires_no_opencv_and_pip_check_is_clean():
    # Neither opencv-python nor opencv-python-headless: installing or uninstalling either one
    # beside this package cannot break the other's cv2 on our account.
    requires = importlib.metadata.requires("mlflow-eigencam") or []
    assert not [r for r in requires if r.lower().startswith("opencv")], requires
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_colormaps_are_opencvs():
    for name, number in COLORMAPS.items():
        assert number == getattr(cv2, "COLORMAP_" + name.upper()), name
        bgr = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(256, 1), number).reshape(256, 3)
        np.testing.assert_array_equal(_colormap_rgb(number), bgr[:, ::-1], err_msg=name)


@pytest.mark.parametrize("hw", [(7, 7), (224, 224), (100, 37), (5, 3), (3, 14), (2, 2)])
def test_resize_bilinear_is_opencvs_inter_linear(hw):
    m = np.random.default_rng(sum(hw)).normal(size=(7, 9)).astype(np.float32)
    ref = cv2.resize(m, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(resize_bilinear(m, *hw), ref, atol=1e-5)


@pytest.mark.parametrize("shape,sigma", [((2, 3, 40, 56), 7.0), ((1, 1, 12, 9), 2.5), ((1, 3, 64, 64), 8.0)])
def test_gaussian_blur_is_opencvs_reflect_blur(shape, sigma):
    x = np.random.default_rng(shape[-1]).random(shape, dtype=np.float32)
    ref = np.stack([np.stack([cv2.GaussianBlur(p, (0, 0), sigma, borderType=cv2.BORDER_REFLECT) for p in img])
                    for img in x])
    np.testing.assert_allclose(gaussian_blur(x, sigma), ref, atol=1e-5)
