"""Keras 3 integration: ``from mlflow_eigencam.keras import EigenCAMCallback``.

Importing this module imports Keras, and through it the backend Keras is set to
(``KERAS_BACKEND``: TensorFlow, JAX or torch); it imports TensorFlow itself only when that
is the backend. The package itself imports no framework.
"""

from __future__ import annotations

from .integrations.keras import PROBE_BATCH_SIZE, EigenCAMCallback, take_samples

__all__ = ["EigenCAMCallback", "PROBE_BATCH_SIZE", "take_samples"]
