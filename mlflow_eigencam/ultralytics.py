"""Ultralytics YOLO integration: ``from mlflow_eigencam.ultralytics import EigenCAMCallback``.

Importing this module imports torch (and Ultralytics when training starts); the package
itself does not.
"""

from __future__ import annotations

from .integrations.ultralytics import EigenCAMCallback

__all__ = ["EigenCAMCallback"]
