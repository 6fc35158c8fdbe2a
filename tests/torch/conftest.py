"""Fixtures of the torch / Lightning tests: tiny seeded models, shapes data, hook checks."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same torch random state, on few threads (2-core CI)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shapes():
    """32 seeded 16x16 shape images (float32 NCHW) and their labels."""
    from tests.helpers.torch_models import shapes_tensors

    return shapes_tensors(32, 16)
