"""PyTorch integration: ``from mlflow_eigencam.pytorch import EigenCAMMonitor``.

Importing this module imports torch; the package itself does not.
"""

from __future__ import annotations

from .integrations.torch import (
    MAX_EXTRA_TOKENS,
    EigenCAMMonitor,
    find_target_layer,
    preserve_training_flags,
    resolve_target_layer,
    tokens_to_grid,
    unwrap_model,
)

__all__ = [
    "EigenCAMMonitor",
    "MAX_EXTRA_TOKENS",
    "find_target_layer",
    "preserve_training_flags",
    "resolve_target_layer",
    "tokens_to_grid",
    "unwrap_model",
]
