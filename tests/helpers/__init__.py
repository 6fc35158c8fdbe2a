"""Helpers shared by the test groups: tiny seeded models, the SVD oracle, MLflow read-back and
a real MLflow server. Importable as ``tests.helpers`` (pytest's ``pythonpath`` puts the
repository root and ``examples/`` on the path; child processes get :func:`child_env`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def child_env(**extra: str) -> Dict[str, str]:
    """``os.environ`` plus ``extra``, with the repository root and ``examples/`` first on
    ``PYTHONPATH``: what a script started by a test needs to import ``tests.helpers``."""
    env = dict(os.environ, **extra)
    paths = [str(ROOT), str(EXAMPLES)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env
