"""Per-epoch signals the logger computes beside the maps: one class per signal, each with
``update`` (one sample), ``summary`` (the epoch's metric value) and ``reset`` (the epoch
ends: logged, or discarded).

* :class:`MapChange`: explanation drift (``map_change``). Capped and streaming mode both go
  through it, so both store the previous epoch's maps the same way.
* :class:`Localization`: where true boxes or masks are known, the share of the map's
  positive PC1 mass inside them (``localization``) and whether its peak is (``pointing_game``).
* :class:`SampleMean`: a per-sample score computed elsewhere (``faithfulness`` needs the
  model, so the integrations compute it with :func:`perturbed_batch` and
  :func:`faithfulness_scores` and hand the scores to the logger).
* :class:`Fixation`: label-free, do the maps of different samples pile up at one place
  (``fixation``): each sample's map against the mean map of the others.
* :class:`StableEpoch`: the first logged epoch after which ``map_change`` stays below
  :data:`STABLE_MAP_CHANGE` (the run tag ``mlflow_eigencam.stable_epoch``).
* :func:`alarms`: which epoch means cross the documented alarm thresholds.

A new signal is a class with the same three methods, a table column and a metric key in
:mod:`._layout`. See docs/signals.md for what each score means and its limits.
"""

from __future__ import annotations

from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

from . import _layout
from .errors import WarnOnce
from .images import gaussian_blur, resize_bilinear, upsample

__all__ = ["ALARM_MIN_ACCURACY", "DEFAULT_FRACTIONS", "ALARM_MIN_SAMPLES", "FIXATION_ALARM", "Fixation",
           "LOCALIZATION_ALARM", "Localization", "MapChange", "STABLE_MAP_CHANGE", "SampleMean",
           "StableEpoch", "Watch", "alarms", "faithfulness_scores", "fixation", "localization",
           "map_change", "perturbed_batch", "top_masks", "true_region", "upsample"]

#: Fractions of the image (top of the map's ranking) kept / dropped by the faithfulness pass.
DEFAULT_FRACTIONS: Tuple[float, ...] = (0.5,)


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


# -- localization -------------------------------------------------------------------------------

def true_region(height: int, width: int, boxes: Any = None, mask: Any = None) -> Optional[np.ndarray]:
    """The union of an image's true boxes and mask as a boolean ``(height, width)`` array.

    Args:
        boxes: ``(n, 4)`` ``(x1, y1, x2, y2)`` in image pixels (clipped to the image; a pixel
            belongs to a box when its centre lies inside), or None.
        mask: ``(height, width)``: nonzero inside the region, or None.

    Returns:
        The region, or None when neither is given or both are empty (nothing to score).

    Raises:
        ValueError: boxes that are not (n, 4), or a mask of another size (named).
    """
    region = np.zeros((int(height), int(width)), dtype=bool)
    if boxes is not None:
        b = np.asarray(boxes, dtype=np.float64)
        if b.size and b.shape[-1] != 4 or b.ndim > 2:
            raise ValueError(f"boxes must be (n, 4) x1, y1, x2, y2 pixels, got shape {b.shape}")
        for x1, y1, x2, y2 in b.reshape(-1, 4):
            # Pixel (r, c) has its centre at (c + 0.5, r + 0.5).
            c1, c2 = int(np.ceil(min(x1, x2) - 0.5)), int(np.ceil(max(x1, x2) - 0.5))
            r1, r2 = int(np.ceil(min(y1, y2) - 0.5)), int(np.ceil(max(y1, y2) - 0.5))
            region[max(r1, 0):max(r2, 0), max(c1, 0):max(c2, 0)] = True
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != region.shape:
            raise ValueError(f"mask must be the image's size {region.shape}, got shape {m.shape}")
        region |= m.astype(bool)
    return region if boxes is not None or mask is not None else None


def localization(heat: np.ndarray, region: np.ndarray) -> Tuple[Optional[float], Optional[bool]]:
    """How much of a map lies on the true region.

    Args:
        heat: ``(H, W)`` float >= 0, the map at image resolution (:func:`upsample`).
        region: ``(H, W)`` bool, the true region (:func:`true_region`).

    Returns:
        ``(share, hit)``: the share in [0, 1] of the map's mass inside the region, and
        whether its peak (the first pixel of highest value, row-major) is inside (the
        pointing game). ``(None, None)`` for an empty map (no positive mass) or an empty
        region; ``hit`` is None for a flat map (no peak).
    """
    total = float(heat.sum(dtype=np.float64))
    if not np.isfinite(total) or total <= 0 or not region.any():
        return None, None
    share = float(np.clip(heat[region].sum(dtype=np.float64) / total, 0.0, 1.0))
    top = float(heat.max())
    if top - float(heat.min()) <= 1e-6 * top:
        return share, None
    return share, bool(region.flat[int(np.argmax(heat))])


class SampleMean:
    """A per-sample score per (mode, ds_id) key, averaged over the epoch's samples that
    have one. ``update`` returns the value (None: this sample has none)."""

    def __init__(self) -> None:
        self._values: Dict[Hashable, List[float]] = {}

    def update(self, key: Hashable, value: Optional[float]) -> Optional[float]:
        """One sample's score (None or NaN: none)."""
        if value is None or not np.isfinite(value):
            return None
        self._values.setdefault(key, []).append(float(value))
        return float(value)

    def summary(self, key: Hashable) -> Optional[float]:
        """Mean over this epoch's scored samples of ``key``; None when none was scored."""
        values = self._values.get(key)
        return float(np.mean(values)) if values else None

    def reset(self, key: Hashable, *, logged: bool) -> None:
        """The epoch of ``key`` ends (logged or not: nothing carries over)."""
        self._values.pop(key, None)


class Localization:
    """``localization`` and ``pointing_game`` per (mode, ds_id) key: each sample's PC1 map
    at image resolution against its true region (boxes or mask)."""

    def __init__(self) -> None:
        self.share, self.hit = SampleMean(), SampleMean()

    def update(self, key: Hashable, heat: np.ndarray,
               region: Optional[np.ndarray]) -> Tuple[Optional[float], Optional[bool]]:
        """One sample's map ``(H, W)`` (:func:`upsample`) and true region (None: unknown);
        returns ``(share, hit)`` as :func:`localization` does."""
        if region is None:
            return None, None
        share, hit = localization(heat, region)
        self.share.update(key, share)
        self.hit.update(key, None if hit is None else float(hit))
        return share, hit

    def summary(self, key: Hashable) -> Tuple[Optional[float], Optional[float]]:
        """(mean share, pointing-game hit rate) over the scored samples; None where none."""
        return self.share.summary(key), self.hit.summary(key)

    def reset(self, key: Hashable, *, logged: bool) -> None:
        """The epoch of ``key`` ends."""
        self.share.reset(key, logged=logged)
        self.hit.reset(key, logged=logged)


# -- faithfulness (the integrations run the model) ----------------------------------------------

def check_fractions(fractions: Sequence[float]) -> Tuple[float, ...]:
    """``fractions`` as a tuple of floats in (0, 1), or a ValueError naming the value."""
    try:
        out = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise ValueError(f"faithfulness fractions must be numbers in (0, 1), got {fractions!r}") from None
    if not out or not all(0 < f < 1 for f in out):
        raise ValueError(f"faithfulness fractions must be numbers in (0, 1), got {fractions!r}")
    return out


def top_masks(heat: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
    """The top-ranked pixels of each map.

    Args:
        heat: ``(n, H, W)`` float, maps at image resolution.
        fractions: F fractions in (0, 1).

    Returns:
        ``(F, n, H, W)`` bool: for each fraction p the ``ceil(p H W)`` pixels of highest
        value (ties: the first in row-major order), so the count never depends on ties.
    """
    n, h, w = heat.shape
    order = np.argsort(-heat.reshape(n, h * w), axis=1, kind="stable")
    out = np.zeros((len(fractions), n, h * w), dtype=bool)
    for f, p in enumerate(fractions):
        k = int(np.ceil(p * h * w))
        np.put_along_axis(out[f], order[:, :k], True, axis=1)
    return out.reshape(len(fractions), n, h, w)


def blurred(x: np.ndarray, sigma: Optional[float] = None) -> np.ndarray:
    """A heavily blurred copy of a batch of model inputs: what replaces the removed pixels.

    Args:
        x: ``(n, C, H, W)`` float32, in the model's own input space (normalised or not:
            a blur is linear, so it commutes with the normalisation).
        sigma: Gaussian sigma in pixels; default ``max(H, W) / 8``.
    """
    h, w = x.shape[2:]
    s = float(sigma) if sigma is not None else max(h, w) / 8.0
    return gaussian_blur(x, s)


def perturbed_batch(x: np.ndarray, heat: np.ndarray, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                    sigma: Optional[float] = None) -> np.ndarray:
    """The faithfulness pass's inputs: the clean images, then per fraction p "keep the top
    p" (the rest blurred) and "drop the top p" (the top blurred).

    Args:
        x: ``(n, C, H, W)`` float32 model inputs.
        heat: ``(n, H, W)`` maps at the inputs' resolution (:func:`upsample`).
        fractions: F fractions in (0, 1).
        sigma: The blur (see :func:`blurred`).

    Returns:
        ``((1 + 2F) n, C, H, W)`` float32: ``[clean, keep_1, drop_1, keep_2, drop_2, ...]``,
        n rows each, the order :func:`faithfulness_scores` reads.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4 or heat.shape != (x.shape[0],) + x.shape[2:]:
        raise ValueError(f"inputs (n, C, H, W) and maps (n, H, W) must agree, got {x.shape} "
                         f"and {heat.shape}")
    soft = blurred(x, sigma)
    parts = [x]
    for top in top_masks(heat, check_fractions(fractions))[:, :, None]:
        parts.append(np.where(top, x, soft))   # keep the top, blur the rest
        parts.append(np.where(top, soft, x))   # blur the top, keep the rest
    return np.concatenate(parts)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(m, K)`` scores (float64)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def faithfulness_scores(outputs: np.ndarray, n: int, *,
                        probabilities: Optional[bool] = None) -> Optional[np.ndarray]:
    """Per-sample faithfulness from the model's outputs on :func:`perturbed_batch`.

    For each sample the class predicted on the clean image is scored: the mean over the
    fractions of ``p(class | top kept) - p(class | top dropped)``. Near 1: the top of the
    map carries the prediction; near 0: the prediction does not depend on it (or on the
    image); negative: the rest of the image carries it.

    Args:
        outputs: ``((1 + 2F) n, K)`` logits (softmax taken) or probabilities.
        n: Samples.
        probabilities: ``outputs`` are probabilities already; None: they are when every
            row is >= 0 and sums to 1 (a softmax head, as Keras models often end).

    Returns:
        ``(n,)`` float64 in [-1, 1], or None when the outputs are not class scores
        (not 2-D, K < 2, or a row count that is not (1 + 2F) n).
    """
    out = np.asarray(outputs)
    if out.ndim != 2 or out.shape[1] < 2 or n < 1 or out.shape[0] % n or (out.shape[0] // n) % 2 != 1:
        return None
    if probabilities is None:
        rows = out.astype(np.float64)
        probabilities = bool((rows >= 0).all() and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3))
    p = out.astype(np.float64) if probabilities else softmax(out)
    p = p.reshape(-1, n, p.shape[1])  # (1 + 2F, n, K)
    cls = np.argmax(p[0], axis=1)
    chosen = np.take_along_axis(p, cls[None, :, None], axis=2)[..., 0]  # (1 + 2F, n)
    return (chosen[1::2] - chosen[2::2]).mean(axis=0)


# -- fixation (label-free) ----------------------------------------------------------------------

def _fixation_map(pc1: np.ndarray, shape: Optional[Tuple[int, int]] = None) -> Optional[np.ndarray]:
    """A PC1 map as :func:`fixation` compares it: ReLU, bilinear to ``shape`` ``(h, w)``
    when given and different, peak scaled to 1; None for a map with no positive mass."""
    m = np.maximum(np.nan_to_num(np.asarray(pc1, dtype=np.float32), nan=0.0, posinf=0.0,
                                 neginf=0.0), 0.0)
    if m.ndim != 2 or m.size == 0:
        return None
    if shape is not None and m.shape != tuple(shape):
        m = resize_bilinear(m, int(shape[0]), int(shape[1]))
    peak = float(m.max())
    return m / peak if peak > 0 else None


def fixation(maps: Sequence[Optional[np.ndarray]]) -> List[Optional[float]]:
    """Do the maps of different samples sit at the same place of the image?

    Each map is made comparable (ReLU, resized to the first map's ``(h, w)``, peak scaled
    to 1); each sample's score is the Pearson correlation of its map with the mean map of
    the *other* samples (leave-one-out, so a sample never correlates with itself).

    Args:
        maps: n ``(h, w)`` float PC1 maps (any sign and scale), or None (no map).

    Returns:
        n values in [-1, 1] (near 1: this map sits where the others sit; near 0: its place
        is unrelated to theirs), None for a sample without a map, with a flat or empty map,
        or when fewer than 2 samples have one.
    """
    first = next((np.shape(m) for m in maps if m is not None and np.ndim(m) == 2), None)
    q = [None if m is None or first is None else _fixation_map(m, first) for m in maps]
    kept = [(i, m) for i, m in enumerate(q) if m is not None and float(m.std()) > 0]
    out: List[Optional[float]] = [None] * len(maps)
    if len(kept) < 2:
        return out
    valid = [i for i, _ in kept]
    stack = np.stack([m for _, m in kept]).reshape(len(kept), -1).astype(np.float64)
    total = stack.sum(axis=0)
    for row, i in enumerate(valid):
        a = stack[row] - stack[row].mean()
        b = (total - stack[row]) / (len(valid) - 1)
        b = b - b.mean()
        norm = float(np.sqrt((a @ a) * (b @ b)))
        out[i] = None if norm == 0 else float(np.clip((a @ b) / norm, -1.0, 1.0))
    return out


class Fixation:
    """``fixation`` per (mode, ds_id) key: the epoch's PC1 maps are kept (float16 at map
    resolution, 2 h w bytes per sample, as :class:`MapChange` keeps them) and scored
    together when asked, since each sample is compared with all the others."""

    def __init__(self) -> None:
        self._maps: Dict[Hashable, Dict[str, Optional[np.ndarray]]] = {}
        self._scores: Dict[Hashable, Dict[str, Optional[float]]] = {}

    def update(self, key: Hashable, sample_id: str, pc1: Optional[np.ndarray]) -> None:
        """One sample's ``(h, w)`` PC1 map this epoch (None: no map)."""
        self._maps.setdefault(key, {})[sample_id] = None if pc1 is None else _stored(pc1)
        self._scores.pop(key, None)

    def values(self, key: Hashable) -> Dict[str, Optional[float]]:
        """``{sample_id: fixation}`` of this epoch's samples of ``key`` (:func:`fixation`)."""
        if key not in self._scores:
            maps = self._maps.get(key, {})
            self._scores[key] = dict(zip(maps, fixation(list(maps.values()))))
        return self._scores[key]

    def summary(self, key: Hashable) -> Optional[float]:
        """Mean fixation over the scored samples of ``key``; None when fewer than 2 maps."""
        scores = [v for v in self.values(key).values() if v is not None]
        return float(np.mean(scores)) if scores else None

    def reset(self, key: Hashable, *, logged: bool) -> None:
        """The epoch of ``key`` ends (logged or not: nothing carries over)."""
        self._maps.pop(key, None)
        self._scores.pop(key, None)


# -- stable_epoch -------------------------------------------------------------------------------

#: ``map_change`` below this counts as "the maps stopped moving" (:class:`StableEpoch`).
STABLE_MAP_CHANGE = 0.05


class StableEpoch:
    """The first logged epoch after which the mean ``map_change`` stays below
    ``threshold``, per (mode, ds_id) key and for the whole run.

    A key's value is the logged epoch ``e`` such that every logged epoch after ``e`` has a
    mean ``map_change`` (against its previous logged epoch) below ``threshold``, and at
    least one does; None while the latest change is at or above it (the value moves later
    when the maps move again) or before a second logged epoch.
    """

    def __init__(self, threshold: float = STABLE_MAP_CHANGE) -> None:
        self.threshold = float(threshold)
        self._series: Dict[Hashable, List[Tuple[int, Optional[float]]]] = {}

    def update(self, key: Hashable, epoch: int, change: Optional[float]) -> None:
        """A logged epoch of ``key`` and its mean ``map_change`` (None at the first)."""
        self._series.setdefault(key, []).append((int(epoch), change))

    def value(self, key: Hashable) -> Optional[int]:
        """The key's stable epoch, or None (see the class)."""
        series = self._series.get(key, [])
        stable = None
        for (previous, _), (_, change) in zip(series, series[1:]):
            if change is None or change >= self.threshold:
                stable = None
            elif stable is None:
                stable = previous
        return stable

    def run_value(self) -> Optional[int]:
        """The run's stable epoch: the latest of its keys' (every monitored data set has
        settled by then); None while a key with two logged epochs has not settled. Keys
        logged only once have no verdict and are left out."""
        values = [self.value(k) for k, s in self._series.items() if len(s) > 1]
        if not values or any(v is None for v in values):
            return None
        return max(v for v in values if v is not None)


# -- alarms -------------------------------------------------------------------------------------

#: ``fixation`` at or above this: the maps pile up at one place (docs/signals.md).
FIXATION_ALARM = 0.8
#: ``localization`` below this: the maps have left the true regions.
LOCALIZATION_ALARM = 0.3
#: Alarms are raised only while the kept samples' accuracy is known (labels and predictions)
#: and at least this: a shortcut is suspicious in a model that is right, not in one that
#: guesses (an untrained model's maps often sit alike, at the padding or the centre).
ALARM_MIN_ACCURACY = 0.5
#: A fixation alarm needs this many scored samples (two maps correlate by chance).
ALARM_MIN_SAMPLES = 3


def alarms(means: Dict[str, Optional[float]], per_sample: Dict[str, Dict[str, Optional[float]]],
           accuracy: Optional[float]) -> List[Tuple[str, float, str, float, List[str]]]:
    """The signals of one epoch of one (mode, ds_id) that cross their alarm thresholds.

    Args:
        means: The epoch's mean signals, ``{name: value}`` (None: not computed).
        per_sample: ``{name: {sample_id: value}}``, to name the samples that cross.
        accuracy: The kept samples' accuracy in [0, 1], or None when unknown (no labels).

    Returns:
        ``(signal, value, comparison, threshold, sample_ids)`` per alarm: ``fixation >=``
        :data:`FIXATION_ALARM` (over :data:`ALARM_MIN_SAMPLES` or more samples),
        ``localization <`` :data:`LOCALIZATION_ALARM`; none while ``accuracy`` is unknown
        or below :data:`ALARM_MIN_ACCURACY`.
    """
    if accuracy is None or accuracy < ALARM_MIN_ACCURACY:
        return []
    out = []
    for name, cmp, threshold in (("fixation", ">=", FIXATION_ALARM),
                                 ("localization", "<", LOCALIZATION_ALARM)):
        value = means.get(name)
        if value is None or not (value >= threshold if cmp == ">=" else value < threshold):
            continue
        scored = {sid: v for sid, v in per_sample.get(name, {}).items() if v is not None}
        if name == "fixation" and len(scored) < ALARM_MIN_SAMPLES:
            continue
        ids = [sid for sid, v in scored.items() if (v >= threshold if cmp == ">=" else v < threshold)]
        out.append((name, float(value), cmp, threshold, ids))
    return out


class Watch:
    """A run's ``stable_epoch`` and alarms, fed each logged epoch of each (mode, ds_id):
    returns the run tags that changed (:data:`_layout.TAG_STABLE_EPOCH`,
    :data:`_layout.TAG_ALARM`) and warns once per (signal, mode, ds_id) alarm (an
    :class:`~mlflow_eigencam.errors.EigenCAMWarning`, also in the ``mlflow_eigencam`` log);
    never raises for what it finds."""

    def __init__(self, threshold: float = STABLE_MAP_CHANGE) -> None:
        self.stable = StableEpoch(threshold)
        self._stable_tag: Optional[str] = None
        self._alarms: Dict[Tuple[str, Hashable], str] = {}
        self._once = WarnOnce()

    def epoch(self, epoch: int, key: Tuple[str, Optional[str]], rows: Sequence[dict],
              change: Optional[float], localization: Optional[float],
              fixation: Optional[float]) -> Dict[str, str]:
        """One logged epoch of ``key``: its table rows (``sample_id``, ``correct`` and the
        per-sample signals) and mean ``map_change``, ``localization`` and ``fixation``
        (None: not computed). Returns the run tags to set (empty: none changed)."""
        tags: Dict[str, str] = {}
        self.stable.update(key, epoch, change)
        stable = self.stable.run_value()
        text = "none" if stable is None else str(stable)
        if text != self._stable_tag and (stable is not None or self._stable_tag is not None):
            self._stable_tag = tags[_layout.TAG_STABLE_EPOCH] = text
        correct = [bool(r["correct"]) for r in rows if r.get("correct") is not None]
        names = (_layout.SIGNAL_FIXATION, _layout.SIGNAL_LOCALIZATION)
        found = alarms(dict(zip(names, (fixation, localization))),
                       {n: {str(r.get("sample_id")): r.get(n) for r in rows} for n in names},
                       float(np.mean(correct)) if correct else None)
        for name, value, cmp, threshold, ids in found:
            if (name, key) in self._alarms:
                continue
            shown = ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
            text = (f"epoch {epoch}: {name} {value:.2f} {cmp} {threshold} on mode={key[0]!r} "
                    f"ds_id={_layout.ds_label(key[1])!r} (samples: {shown or 'n/a'})")
            self._alarms[(name, key)] = text
            self._once.warn((name, key), f"alarm: {text}; see docs/signals.md (training goes on)",
                            stacklevel=6)
            tags[_layout.TAG_ALARM] = "; ".join(self._alarms.values())[:5000]
        return tags
