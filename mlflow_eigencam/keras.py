"""Keras 3 integration: ``from mlflow_eigencam.keras import EigenCAMCallback``.

Importing this module imports Keras, and through it the backend Keras is set to
(``KERAS_BACKEND``: TensorFlow, JAX or torch); it imports TensorFlow itself only when that
is the backend. The package itself imports no framework.

``Samples`` is what :attr:`EigenCAMCallback.samples` holds per (mode, dataset id). How the
callback reads data (``integrations.keras_data.take_samples``) is internal: hand the data
to the callback, or let autolog hand it ``fit``'s.
"""

from __future__ import annotations

from .integrations.keras import PROBE_BATCH_SIZE, EigenCAMCallback
from .integrations.keras_data import Samples

__all__ = ["EigenCAMCallback", "PROBE_BATCH_SIZE", "Samples"]
