"""Lightning integration: ``from mlflow_eigencam.lightning import EigenCAMCallback``.

Importing this module imports ``lightning.pytorch`` (or ``pytorch_lightning`` when only that
is installed) and torch; the package itself does not. The callback's default batch splitter
needs torch only: ``mlflow_eigencam.pytorch.default_batch_to_xy``.
"""

from __future__ import annotations

from .integrations.lightning import EigenCAMCallback

__all__ = ["EigenCAMCallback"]
