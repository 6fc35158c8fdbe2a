"""mlflow_eigencam: EigenCAM explanations of a convolution layer, logged to MLflow per epoch.

Importing the package imports no deep-learning framework: the integrations
(``mlflow_eigencam.pytorch``, ``.lightning``, ``.keras``) import theirs when used.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Imported eagerly (numpy only) so that `mlflow_eigencam.eigencam` is the function, not the
# submodule of the same name that Python would otherwise bind here on first import.
from .eigencam import EigenCAMResult, NonFiniteActivationsWarning, eigencam  # noqa: E402

# Likewise `mlflow_eigencam.compare` (light at import: MLflow and the renderer load when it runs).
from .compare import compare  # noqa: E402

__all__ = [
    "EigenCAMLogger",
    "EigenCAMResult",
    "EigenCAMWarning",
    "NonFiniteActivationsWarning",
    "autolog",
    "compare",
    "eigencam",
    "send_spool",
    "__version__",
]

# Lazy attributes: the math and the logger pull in mlflow/OpenCV, which users of
# `mlflow_eigencam.eigencam` alone should not pay for at import time.
_LAZY = {
    "EigenCAMLogger": ("mlflow_eigencam.logger", "EigenCAMLogger"),
    "EigenCAMWarning": ("mlflow_eigencam.errors", "EigenCAMWarning"),
    "send_spool": ("mlflow_eigencam._recovery", "send_spool"),
    "autolog": ("mlflow_eigencam.autolog", "autolog"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mlflow_eigencam' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(list(globals()) + list(_LAZY))
