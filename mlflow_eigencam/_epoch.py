"""The pieces of one logged epoch of one (mode, ds_id), for :mod:`~mlflow_eigencam.logger`.

What a batch brought for the explanation signals (:func:`batch_extras`, :func:`extra`), the
signals' bookkeeping per key across epochs (:class:`Signals`: ``map_change``, localization,
pointing game, faithfulness, fixation, and the run's ``stable_epoch`` and alarms), each
sample's card and its geometry, and the files a sample adds to the epoch's bundle. The logger
orchestrates (under its lock, on the thread that calls it); nothing here talks to the sink.
"""

from __future__ import annotations

import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _layout
from ._layers import LayerResult
from .metrics import Fixation, Localization, MapChange, SampleMean, Watch, true_region, upsample
from .render import card_geometry, render_card, render_detection_card, render_segmentation_card
from .samples import Sample

Key = Tuple[str, Optional[str]]
#: What a batch brought for one sample's signals: true boxes ``(n, 4)``, true mask ``(H, W)``,
#: faithfulness score (each None when absent).
Extra = Tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[float]]


def batch_extras(boxes: Any, masks: Any, faithfulness: Any, batch: int) -> Optional[List[Any]]:
    """``on_batch_end``'s ``boxes`` / ``masks`` / ``faithfulness`` per row, as given (only
    the kept rows are converted, by :func:`extra`); None when none was given.

    Raises:
        ValueError: a length other than the batch's.
    """
    if boxes is None and masks is None and faithfulness is None:
        return None
    columns: List[List[Any]] = []
    for name, value in (("boxes", boxes), ("masks", masks), ("faithfulness", faithfulness)):
        if value is None:
            columns.append([None] * batch)
            continue
        items = list(value) if not isinstance(value, np.ndarray) or value.ndim else [value]
        if len(items) != batch:
            raise ValueError(f"{name} have {len(items)} entries but the batch has {batch} images")
        columns.append(items)
    return list(zip(*columns))


def extra(raw: Any, row: int, image_hw: Tuple[int, int]) -> Extra:
    """One kept row's entry of :func:`batch_extras` as arrays (copies) and a float.

    Raises:
        ValueError: boxes that are not (n, 4), or a mask not of the image's ``(H, W)``.
    """
    b, m, f = raw
    if b is not None:
        if np.size(b) % 4 or np.ndim(b) > 2:
            raise ValueError(f"boxes[{row}] must be (n, 4) x1, y1, x2, y2 pixels, got shape "
                             f"{np.shape(b)}")
        b = np.array(b, dtype=np.float64).reshape(-1, 4)
    if m is not None:
        m = np.array(m, dtype=bool)
        if m.shape != tuple(image_hw):
            raise ValueError(f"masks[{row}] must be the image's (H, W) = {tuple(image_hw)}, "
                             f"got shape {m.shape}")
    return (b, m, None if f is None else float(f))


class Signals:
    """The explanation signals per key (``(mode, ds_id)``, or ``(mode, ds_id, layer)`` for a
    further layer; docs/signals.md): each sample's values for its table row, the epoch means
    for the metrics, and what batches brought for them until the epoch ends."""

    def __init__(self) -> None:
        #: Explanation drift (keeps the previous logged epoch's PC1 maps).
        self.map_change = MapChange()
        self.localization = Localization()
        self.faithfulness = SampleMean()
        #: Label-free fixation, the run's stable epoch and the alarms raised.
        self.fixation = Fixation()
        self.watch = Watch()
        #: Per (mode, ds_id): sample index -> what its batch brought (:data:`Extra`).
        self.extras: Dict[Key, Dict[int, Extra]] = {}

    def keep(self, key: Key, added: Sequence[Sample], converted: Sequence[Extra]) -> None:
        """What the batch brought for the kept samples (the batch's first rows)."""
        kept = self.extras.setdefault(key, {})
        for s, e in zip(added, converted):
            kept[s.index] = e

    def sample(self, key: Any, s: Sample, pc1: Optional[np.ndarray],
               extra: Optional[Extra]) -> Dict[str, Optional[float]]:
        """One sample's signals for its table row (only those it can have), each also
        counted into its epoch mean."""
        out: Dict[str, Optional[float]] = {}
        boxes, mask, score = extra if extra is not None else (None, None, None)
        if boxes is None and s.label_boxes is not None:
            boxes = s.label_boxes.boxes  # a detector's true boxes
        if mask is None and s.label_mask is not None:
            mask = s.label_mask.foreground()  # a segmenter's true mask, background left out
        if boxes is not None or mask is not None:
            h, w = s.image.shape[:2]
            region = true_region(h, w, boxes, mask)
            share, hit = (None, None) if pc1 is None else self.localization.update(
                key, upsample(pc1, h, w, s.map_extent), region)
            out[_layout.SIGNAL_LOCALIZATION] = share
            out[_layout.SIGNAL_POINTING_GAME] = None if hit is None else float(hit)
        if score is not None:
            out[_layout.SIGNAL_FAITHFULNESS] = self.faithfulness.update(key, score)
        self.fixation.update(key, s.sample_id, pc1)  # scored at the epoch end, against the others
        return out

    def _means(self, key: Any) -> List[Tuple[str, Optional[float]]]:
        """``[(signal name, epoch mean or None)]`` of the per-sample signals scored as the
        samples come (fixation is scored at the epoch end)."""
        share, hits = self.localization.summary(key)
        return [(_layout.SIGNAL_LOCALIZATION, share), (_layout.SIGNAL_POINTING_GAME, hits),
                (_layout.SIGNAL_FAITHFULNESS, self.faithfulness.summary(key))]

    def summaries(self, key: Any) -> List[Tuple[str, float]]:
        """``[(name, epoch mean)]`` of ``map_change`` and the signals some sample of ``key``
        had (a further layer's metrics)."""
        pairs = [(_layout.TABLE_MAP_CHANGE_COLUMN, self.map_change.summary(key))] + self._means(key)
        return [(n, float(v)) for n, v in pairs if v is not None]

    def score_rows(self, key: Key, rows: Sequence[dict]) -> None:
        """Each row's ``fixation``, scored once the epoch's maps are all in (each against the
        others)."""
        fixation = self.fixation.values(key)
        for r in rows:
            value = fixation.get(r["sample_id"])
            if value is not None:
                r[_layout.SIGNAL_FIXATION] = round(value, 6)

    def metrics(self, key: Key, epoch: int, now: int) -> List[List[Any]]:
        """The epoch's ``map_change`` (none at the first logged epoch) and the means of the
        signals some sample had, as ``[name, value, step, timestamp]``."""
        mode, ds_id = key
        metrics: List[List[Any]] = []
        change = self.map_change.summary(key)
        if change is not None:
            metrics.append([_layout.map_change_key(mode, ds_id), change, epoch, now])
        for name, value in self._means(key) + [(_layout.SIGNAL_FIXATION, self.fixation.summary(key))]:
            if value is not None:  # only the signals some sample had
                metrics.append([_layout.signal_key(mode, ds_id, name), value, epoch, now])
        return metrics

    def reset(self, key: Any, *, logged: bool) -> None:
        """The epoch of ``key`` ends: logged (its maps are the next one's previous maps) or
        discarded."""
        self.map_change.reset(key, logged=logged)
        self.localization.reset(key, logged=logged)
        self.faithfulness.reset(key, logged=logged)
        self.fixation.reset(key, logged=logged)
        self.extras.pop(key, None)


def card(s: Sample, maps: np.ndarray, evr: np.ndarray,
         more: Sequence[Tuple[str, np.ndarray, np.ndarray]] = (), *,
         colormap: Union[str, int], alpha: float, layer: Optional[str]) -> np.ndarray:
    """One sample's card: a detector's, a segmenter's, or the classifier's (with the further
    layers' rows ``more``; ``layer`` names the first one when there are several)."""
    if s.pred_mask is not None or s.label_mask is not None:  # a segmenter's masks (and boxes)
        return render_segmentation_card(
            s.image, maps, pred_mask=s.pred_mask, true_mask=s.label_mask, iou=s.iou,
            pred_boxes=s.pred_boxes, explained_variance=evr, label=s.label, pred=s.pred,
            sample_id=s.sample_id, colormap=colormap, alpha=alpha, map_extent=s.map_extent)
    if s.pred_boxes is not None or s.label_boxes is not None:  # a detector's boxes
        return render_detection_card(
            s.image, maps, pred_boxes=s.pred_boxes, true_boxes=s.label_boxes,
            explained_variance=evr, label=s.label, pred=s.pred, correct=s.correct,
            sample_id=s.sample_id, colormap=colormap, alpha=alpha,
            map_extent=s.map_extent)
    pred = s.pred if s.pred is None or s.pred_score is None else f"{s.pred} {s.pred_score:.2f}"
    return render_card(s.image, maps, explained_variance=evr, label=s.label, pred=pred,
                       correct=s.correct, sample_id=s.sample_id,
                       colormap=colormap, alpha=alpha, map_extent=s.map_extent,
                       layer=layer if more else None, more_layers=more)


def geometry(s: Sample, k: int, layers: List[LayerResult], names: Optional[Sequence[str]]) -> dict:
    """The card's geometry as :func:`card` draws it (a detector's or a segmenter's card: the
    first layer). ``names``: the layers' names when there are several."""
    if not layers or s.pred_boxes is not None or s.label_boxes is not None or \
            s.pred_mask is not None or s.label_mask is not None:
        return card_geometry(s.image.shape[:2], k)
    assert names is not None
    return card_geometry(s.image.shape[:2], k, layers=[(names[0], k)] + [
        (n, r.maps.shape[1]) for n, r, _ in layers])


def sample_files(files: Dict[str, Any], mode: str, ds_id: Optional[str], epoch: int,
                 index: int, now_ms: int, png: Any, preview: Any) -> str:
    """Add one sample's files to an epoch bundle: the image-series point (PNG and the UI's
    WebP preview) and the strip artifact the table points to. Returns the strip's path."""
    key = _layout.image_key(mode, ds_id, index)
    png_path, preview_path = _layout.image_series_files(key, epoch, now_ms, str(uuid.uuid4()))
    card_path = _layout.card_path(mode, ds_id, epoch, index)
    files[png_path] = png
    files[preview_path] = preview
    files[card_path] = png
    return card_path
