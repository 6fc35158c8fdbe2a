"""Keras 3 / TensorFlow integration: ``from mlflow_eigencam.keras import EigenCAMCallback``.

Importing this module imports Keras (and TensorFlow, its backend here); the package itself
does not.
"""

from __future__ import annotations

from .integrations.keras import PROBE_BATCH_SIZE, EigenCAMCallback, take_samples

__all__ = ["EigenCAMCallback", "PROBE_BATCH_SIZE", "take_samples"]
