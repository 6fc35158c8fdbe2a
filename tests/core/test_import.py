"""Importing the package imports no deep-learning framework."""

from __future__ import annotations

import json
import subprocess
import sys

FRAMEWORKS = ("torch", "tensorflow", "keras", "lightning", "pytorch_lightning", "jax", "transformers")


def _modules_after(code: str) -> set:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json\n"
                          "print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"],
                         check=True, capture_output=True, text=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_import_package_imports_no_framework():
    loaded = _modules_after("import mlflow_eigencam")
    assert not loaded & set(FRAMEWORKS), loaded & set(FRAMEWORKS)


def test_core_modules_and_autolog_import_no_framework():
    loaded = _modules_after(
        "import mlflow_eigencam as m\n"
        "from mlflow_eigencam import EigenCAMLogger, eigencam, send_spool, autolog\n"
        "import mlflow_eigencam.render, mlflow_eigencam.samples, mlflow_eigencam.filters\n"
        "import mlflow_eigencam.cli\n"
        "m.autolog(silent=True)\n")
    assert not loaded & set(FRAMEWORKS), loaded & set(FRAMEWORKS)


def test_eigencam_name_is_the_function():
    loaded = _modules_after(
        "import mlflow_eigencam, mlflow_eigencam.logger\n"
        "assert callable(mlflow_eigencam.eigencam), mlflow_eigencam.eigencam\n")
    assert "mlflow_eigencam" in loaded


def test_sample_buffer_imports_no_renderer():
    # The buffer normalises images with numpy alone (mlflow_eigencam.images): no OpenCV, no
    # Pillow, until something draws.
    loaded = _modules_after("import mlflow_eigencam.samples, mlflow_eigencam.filters\n"
                            "import mlflow_eigencam.images")
    assert not loaded & {"cv2", "PIL"}, loaded & {"cv2", "PIL"}


def test_drawing_and_signals_never_import_opencv():
    # The package draws, resizes and blurs without OpenCV (docs/internals.md, "No OpenCV"):
    # a card, a grid, a WebP preview and the faithfulness blur leave cv2 unimported, so
    # opencv-python (Ultralytics) and opencv-python-headless can come and go beside it.
    loaded = _modules_after(
        "import numpy as np\n"
        "from mlflow_eigencam.render import overlay, render_card\n"
        "from mlflow_eigencam.render.png import encode_webp_preview\n"
        "from mlflow_eigencam.metrics import perturbed_batch, upsample\n"
        "img = np.zeros((20, 30, 3), np.uint8); cam = np.random.rand(2, 4, 5)\n"
        "card = render_card(img, cam, explained_variance=[0.6, 0.3], label='a', pred='b')\n"
        "overlay(img, cam[0]); encode_webp_preview(card)\n"
        "perturbed_batch(np.zeros((1, 3, 20, 30), np.float32), upsample(cam[0], 20, 30)[None])\n")
    assert "cv2" not in loaded
