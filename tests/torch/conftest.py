"""Fixtures of the torch / Lightning tests: tiny seeded models, shapes data, hook checks."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tests.helpers.torch_seed import _seeded  # noqa: E402,F401  (autouse, after the skip)


@pytest.fixture
def shapes():
    """32 seeded 16x16 shape images (float32 NCHW) and their labels."""
    from tests.helpers.torch_models import shapes_tensors

    return shapes_tensors(32, 16)
