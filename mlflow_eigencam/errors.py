"""The package's warnings and its one warn-once helper.

Every warning a user sees from mlflow_eigencam is an :class:`EigenCAMWarning` (or, for the
math, :class:`~mlflow_eigencam.eigencam.NonFiniteActivationsWarning`), raised once per kind
of event so that a per-batch problem does not flood the log.
"""

from __future__ import annotations

import logging
import warnings
from typing import Hashable, Set, Type

__all__ = ["EigenCAMWarning", "WarnOnce"]

_log = logging.getLogger("mlflow_eigencam")


class EigenCAMWarning(UserWarning):
    """Warnings from mlflow_eigencam (unreachable server, skipped epochs, leftovers)."""


class WarnOnce:
    """Warn at most once per key: ``warn(key, message)`` returns whether it warned.

    Messages get the ``mlflow_eigencam:`` prefix when they lack it, and also go to the
    ``mlflow_eigencam`` logger (where a job scheduler's log keeps them).
    """

    def __init__(self, category: Type[Warning] = EigenCAMWarning) -> None:
        self._seen: Set[Hashable] = set()
        self._category = category

    def __contains__(self, key: Hashable) -> bool:
        return key in self._seen

    def warn(self, key: Hashable, message: str, stacklevel: int = 2) -> bool:
        """Warn ``message`` unless ``key`` was warned before; ``stacklevel`` as in warnings."""
        if key in self._seen:
            return False
        self._seen.add(key)
        if not message.startswith("mlflow_eigencam"):
            message = f"mlflow_eigencam: {message}"
        warnings.warn(message, self._category, stacklevel=stacklevel + 1)
        _log.warning(message)
        return True

    def reset(self) -> None:
        """Forget every key (a new run warns again)."""
        self._seen.clear()
