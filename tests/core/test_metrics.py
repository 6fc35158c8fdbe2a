"""metrics: per-epoch signals (update / summary / reset); map_change's storage rule."""

from __future__ import annotations

import numpy as np
import pytest

from mlflow_eigencam.metrics import MapChange, map_change


def test_map_change_against_the_previous_logged_epoch_only():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 6, 6))
    m = MapChange()
    assert m.update("k", "s", a) is None and m.summary("k") is None  # first epoch
    m.reset("k", logged=True)
    c = m.update("k", "s", b)
    assert c == pytest.approx(map_change(a, b), abs=2e-3)
    assert m.summary("k") == pytest.approx(c)
    m.reset("k", logged=False)  # a discarded epoch: a stays the reference
    assert m.update("k", "s", b) == pytest.approx(map_change(a, b), abs=2e-3)
    assert m.update("other", "s", b) is None  # per key


def test_previous_maps_are_kept_scaled_to_one_in_float16():
    """Maps of large activations (values ~2e5) overflow float16 raw: stored scaled, the
    drift stays finite and right."""
    rng = np.random.default_rng(1)
    a, b = 2e5 * rng.random((2, 7, 7)).astype(np.float32)
    m = MapChange()
    m.update("k", "s", a)
    m.reset("k", logged=True)
    kept = m._previous["k"]["s"]
    assert kept.dtype == np.float16 and float(np.max(np.abs(kept))) == pytest.approx(1.0)
    c = m.update("k", "s", b)
    assert np.isfinite(c) and c == pytest.approx(map_change(a, b), abs=2e-3)
