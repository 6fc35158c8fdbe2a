"""PyTorch integration: ``from mlflow_eigencam.pytorch import EigenCAMMonitor``.

Importing this module imports torch; the package itself does not.
"""

from __future__ import annotations

from .integrations.torch._model import preserve_training_flags, unwrap_model
from .integrations.torch.batches import default_batch_to_xy
from .integrations.torch.layers import (
    MAX_EXTRA_TOKENS,
    find_target_layer,
    resolve_target_layer,
    tokens_to_grid,
)
from .integrations.torch.monitor import SPLIT_DS_IDS, EigenCAMMonitor

__all__ = [
    "EigenCAMMonitor",
    "MAX_EXTRA_TOKENS",
    "SPLIT_DS_IDS",
    "default_batch_to_xy",
    "find_target_layer",
    "preserve_training_flags",
    "resolve_target_layer",
    "tokens_to_grid",
    "unwrap_model",
]
