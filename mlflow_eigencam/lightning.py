"""Lightning integration: ``from mlflow_eigencam.lightning import EigenCAMCallback``.

Importing this module imports ``lightning.pytorch`` (or ``pytorch_lightning`` when only that
is installed) and torch; the package itself does not.
"""

from __future__ import annotations

from .integrations.lightning import EigenCAMCallback, default_batch_to_xy

__all__ = ["EigenCAMCallback", "default_batch_to_xy"]
