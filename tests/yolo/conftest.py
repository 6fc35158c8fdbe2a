"""Ultralytics YOLO, offline: random-init ``yolov8n.yaml`` on a synthetic shapes dataset.

Ultralytics reads its settings when it is imported, so the environment is set here, before
any test module imports it: no network (``YOLO_OFFLINE``), no telemetry, and a config folder
of our own that already holds ``Arial.ttf`` (Ultralytics fetches that font even offline).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("torch")


def _font() -> Path:
    candidates = [Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")]
    try:
        import matplotlib

        candidates.append(Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf")
    except ImportError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    pytest.skip("no TTF font to stand in for Ultralytics' Arial.ttf", allow_module_level=True)


_CONFIG_DIR = Path(tempfile.mkdtemp(prefix="yolo-config-"))
shutil.copy(_font(), _CONFIG_DIR / "Arial.ttf")
os.environ["YOLO_CONFIG_DIR"] = str(_CONFIG_DIR)
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

pytest.importorskip("ultralytics")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CONFIG_DIR, ignore_errors=True)
