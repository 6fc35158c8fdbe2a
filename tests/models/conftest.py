"""Real torchvision and timm architectures at random init (never a weight download)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

from tests.helpers.torch_seed import _seeded  # noqa: E402,F401  (autouse, after the skip)
