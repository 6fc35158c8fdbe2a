"""Hugging Face Transformers integration: ``from mlflow_eigencam.transformers import EigenCAMCallback``.

Importing this module imports transformers and torch; the package itself does not.
"""

from __future__ import annotations

from .integrations.transformers import EigenCAMCallback

__all__ = ["EigenCAMCallback"]
