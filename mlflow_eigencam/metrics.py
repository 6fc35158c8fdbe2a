"""Per-epoch signals the logger computes beside the maps: one class per signal, each with
``update`` (one sample), ``summary`` (the epoch's metric value) and ``reset`` (the epoch
ends: logged, or discarded).

Today one signal: :class:`MapChange`, explanation drift (``map_change``). Capped and
streaming mode both go through it, so both store the previous epoch's maps the same way.
A new signal is a class with the same three methods, a table column and a metric key in
:mod:`._layout`.
"""

from __future__ import annotations

from typing import Dict, Hashable, List, Optional

import numpy as np

__all__ = ["MapChange", "map_change"]


def map_change(previous: Optional[np.ndarray], current: Optional[np.ndarray]) -> Optional[float]:
    """Explanation drift of one sample: ``1 - Pearson correlation`` of its PC1 maps at two
    consecutive logged epochs, at map resolution.

    Args:
        previous: ``(h, w)`` float map of the previous logged epoch, or None (first epoch).
        current: ``(h, w)`` float map of this epoch, or None.

    Returns:
        A float in [0, 2] (0: the same map up to scale and offset), or None when there is
        nothing to compare (first epoch, no map, or a map of another size). A flat map
        correlates with nothing: 0 when both are flat, else 1.
    """
    if previous is None or current is None or np.shape(previous) != np.shape(current):
        return None
    a = np.asarray(previous, dtype=np.float64).ravel()
    b = np.asarray(current, dtype=np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    na, nb = float(np.sqrt(a @ a)), float(np.sqrt(b @ b))
    if na == 0 or nb == 0:
        return 0.0 if na == nb else 1.0
    return float(np.clip(1.0 - (a @ b) / (na * nb), 0.0, 2.0))


def _stored(pc1: np.ndarray) -> np.ndarray:
    """A PC1 map as kept for the next epoch: scaled to max |m| = 1, then float16
    (2 h w bytes per sample). Scaled first because map_change is scale-free and a raw
    map's values can pass float16's 65504 (activations in the thousands, summed)."""
    m = np.asarray(pc1, dtype=np.float32)
    peak = float(np.max(np.abs(m))) if m.size else 0.0
    scale = 1.0 / peak if np.isfinite(peak) and peak > 0 else 1.0
    return (m * scale).astype(np.float16)


class MapChange:
    """``map_change`` per (mode, ds_id) key: each sample's PC1 map against the one of the
    previous *logged* epoch, matched by ``sample_id``.

    Memory: the maps of one logged epoch and of the epoch in progress, float16 at map
    resolution (2 h w bytes per sample each).
    """

    def __init__(self) -> None:
        self._previous: Dict[Hashable, Dict[str, np.ndarray]] = {}
        self._current: Dict[Hashable, Dict[str, np.ndarray]] = {}
        self._values: Dict[Hashable, List[float]] = {}

    def update(self, key: Hashable, sample_id: str, pc1: Optional[np.ndarray]) -> Optional[float]:
        """One sample's ``(h, w)`` PC1 map this epoch (None: no map); returns its change
        against the previous logged epoch, None when there is nothing to compare."""
        change = map_change(self._previous.get(key, {}).get(sample_id), pc1)
        if pc1 is not None:
            self._current.setdefault(key, {})[sample_id] = _stored(pc1)
        if change is not None:
            self._values.setdefault(key, []).append(change)
        return change

    def summary(self, key: Hashable) -> Optional[float]:
        """Mean change over this epoch's samples of ``key``; None at the first logged epoch."""
        values = self._values.get(key)
        return float(np.mean(values)) if values else None

    def reset(self, key: Hashable, *, logged: bool) -> None:
        """The epoch of ``key`` ends: logged (its maps are the next epoch's previous ones) or
        discarded (the previous logged epoch stays the reference)."""
        current = self._current.pop(key, None)
        self._values.pop(key, None)
        if logged and current is not None:
            self._previous[key] = current
