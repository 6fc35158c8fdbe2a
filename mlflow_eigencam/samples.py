"""The per-epoch sample buffer: a capped set of images, activations, labels and predictions.

Samples are kept per ``(mode, ds_id)`` across batches until ``n_samples`` are found (all of
them with ``n_samples=None``), and only the kept rows are copied. ``take`` hands the samples
of one key over and clears it, which the logger does at every epoch end.

Labels and predictions become one display string per sample (see ``class_values``):

* class indices ``(B,)`` or ``(B, 1)`` -> ints;
* one-hot, probabilities or logits ``(B, ..., K)`` with K > 1 -> argmax over the last axis;
* a float vector or single column whose values all lie in [0, 1] -> a binary probability,
  class 1 when ``> 0.5`` (integral 0.0 / 1.0 labels give the same answer either way);
  other integral floats -> ints; other floats (e.g. a single logit, a regression target)
  are shown as they are, rounded to 4 significant digits;
* strings or bytes -> text;
* detections (a list of one dict per image with ``"boxes"`` ``(n, 4)`` xyxy pixels and
  optionally ``"labels"`` ``(n,)`` and ``"scores"`` ``(n,)``, torchvision's detector output
  and targets) -> the text ``"3 boxes"``, the boxes themselves kept per sample as
  :class:`Boxes` (label names through ``label_mapping``); an instance segmenter's dicts
  may add ``"mask"``, the ``(H, W)`` class indices of the image, kept as a :class:`Mask`
  too (the text then names the mask's classes, as per-pixel classes below);
* per-pixel classes (semantic segmentation), recognised by their size, the images' ``(H, W)``:
  scores or logits ``(B, K, H, W)`` (or channels-last ``(B, H, W, K)``; argmax over K, one
  channel read as a binary score), or masks ``(B, H, W)`` of class indices (pixels of
  ``IGNORE_INDEX`` = 255 or below 0 are ignored; floats in [0, 1] that are not all 0 / 1 read
  as binary probabilities, class 1 above 0.5) -> the class names present, joined
  (``"background, cat"``), the mask kept per sample as :class:`Mask`, and the mean IoU of the
  predicted and true masks (:func:`mask_iou`).

``label_mapping`` turns class indices into names: ``{name: index}`` (the reference's form),
``{index: name}`` (detected when every key is an int and every value a string) or a
sequence of names (``names[index]``). Values it does not map are shown as they are.

Every kept sample gets a ``sample_id``: the first 12 hex digits of the SHA-1 of its uint8
HWC RGB pixels and shape, so the same image can be found across epochs, runs and
experiments.
"""

from __future__ import annotations

import hashlib
import numbers
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from mlflow_eigencam.images import to_rgb_uint8

__all__ = ["BACKGROUND_CLASS", "IGNORE_INDEX", "Boxes", "Mask", "Sample", "SampleBuffer", "class_values",
           "is_detections", "mask_iou", "sample_id", "segmentation_masks"]

ClassValue = Union[int, str, None]
LabelMapping = Union[Mapping[Any, Any], Sequence[str], None]


@dataclass(frozen=True, eq=False)
class Boxes:
    """The boxes of one image (a detector's prediction or its ground truth).

    Attributes:
        boxes: ``(n, 4)`` float64 ``(x1, y1, x2, y2)`` in pixels of the model's input image.
        names: ``n`` display names (``label_mapping`` applied; ``""`` without labels).
        scores: ``(n,)`` float64 confidences, or None (ground truth).
    """

    boxes: np.ndarray
    names: tuple
    scores: Optional[np.ndarray]

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


#: A true mask's pixels of this class (or below 0) are not scored: the void / border label of
#: VOC-style masks. Never a predicted class (an argmax is kept as it is).
IGNORE_INDEX = 255
#: The class that is not the object: ``localization`` scores the map on a true mask's other
#: classes (its foreground).
BACKGROUND_CLASS = 0


@dataclass(frozen=True, eq=False)
class Mask:
    """The per-pixel classes of one image (a segmenter's prediction or its ground truth).

    Attributes:
        classes: ``(H, W)`` int32 class index per pixel, -1 where ignored.
        names: ``{class index: display name}`` of the classes present (``label_mapping``
            applied), in class order.
    """

    classes: np.ndarray
    names: Mapping[int, str]

    def foreground(self) -> np.ndarray:
        """``(H, W)`` bool: the pixels of a class other than background and not ignored."""
        return (self.classes != BACKGROUND_CLASS) & (self.classes >= 0)

    def text(self) -> str:
        """The names of the classes present, joined: what captions and the table show."""
        return ", ".join(self.names.values())


def mask_iou(pred: np.ndarray, true: np.ndarray) -> Optional[float]:
    """Mean IoU of two ``(H, W)`` class masks over the classes present in either, on the
    pixels the true mask does not ignore (-1 in either is left out).

    Returns:
        A float in [0, 1], or None when no pixel is left.
    """
    valid = (true >= 0) & (pred >= 0)
    p, t = pred[valid], true[valid]
    if p.size == 0:
        return None
    ious = []
    for c in np.union1d(np.unique(p), np.unique(t)):
        inter = np.count_nonzero((p == c) & (t == c))
        union = np.count_nonzero((p == c) | (t == c))
        ious.append(inter / union)
    return float(np.mean(ious))


def segmentation_masks(x: Any, image_hw: tuple[int, int], *, name: str = "values") -> Optional[np.ndarray]:
    """Per-pixel classes ``(B, H, W)`` int32 (-1 where ignored) from labels / predictions
    whose size is the images' ``(H, W)``; None for anything else (per-sample classes).

    Args:
        x: ``(B, K, H, W)`` / ``(B, H, W, K)`` scores (argmax over K; K = 1 is a binary
            score, see below), or ``(B, H, W)`` values: integers are class indices
            (``IGNORE_INDEX`` and negatives ignored); floats whose values are all integral
            are read as integers, other floats as a binary probability (class 1 above 0.5)
            when all lie in [0, 1], else as a binary logit (class 1 above 0). A list of
            same-size arrays counts as their stack.
        image_hw: The images' ``(H, W)``.
        name: Used in error messages.

    Raises:
        TypeError: Per-pixel values that are not numbers (named).
    """
    if isinstance(x, (list, tuple)) and x and all(isinstance(v, np.ndarray) and v.ndim >= 2 for v in x):
        if len({v.shape for v in x}) != 1:
            return None
        x = np.stack(x)
    if not isinstance(x, np.ndarray) or x.ndim not in (3, 4):
        return None
    hw = tuple(int(v) for v in image_hw)
    if x.ndim == 4 and tuple(x.shape[2:]) == hw:
        scores: Optional[np.ndarray] = x  # (B, K, H, W)
    elif x.ndim == 4 and tuple(x.shape[1:3]) == hw:
        scores = np.moveaxis(x, -1, 1)  # channels-last (B, H, W, K), a Keras segmenter's
    elif x.ndim == 3 and tuple(x.shape[1:]) == hw:
        scores = None
    else:
        return None
    if x.dtype.kind not in "buif":
        raise TypeError(f"per-pixel {name} must be numbers, got dtype {x.dtype}")
    if scores is not None and scores.shape[1] > 1:
        return np.argmax(scores, axis=1).astype(np.int32)  # every pixel gets a class
    values = scores[:, 0] if scores is not None else x
    if values.dtype.kind == "f":
        finite = values[np.isfinite(values)]
        if finite.size and not np.all(finite == np.round(finite)):
            lo, hi = float(finite.min()), float(finite.max())
            cut = 0.5 if lo >= 0.0 and hi <= 1.0 else 0.0  # a probability, else a logit
            return (values > cut).astype(np.int32)
        values = np.where(np.isfinite(values), values, -1)
    out = values.astype(np.int64)
    return np.where((out < 0) | (out == IGNORE_INDEX), -1, out).astype(np.int32)


def count_text(n: int) -> str:
    """``"1 box"``, ``"3 boxes"``: what captions and the table show for a detection."""
    return f"{n} box" if n == 1 else f"{n} boxes"


def is_detections(x: Any) -> bool:
    """True for a list / tuple of dicts (one per image) that each have a ``"boxes"`` entry."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(
        isinstance(item, Mapping) and "boxes" in item for item in x)


@dataclass
class Sample:
    """One kept sample.

    Attributes:
        index: Position among this epoch's kept samples of its (mode, ds_id), 0..n-1.
        image: ``(H, W, 3)`` uint8 RGB, a copy.
        activations: ``(C, h, w)`` float32, a copy.
        label: Display text after ``label_mapping``, or ``None``.
        pred: Display text after ``label_mapping``, or ``None``.
        correct: Whether label and prediction agree; ``None`` when either is missing.
        sample_id: 12 hex chars, SHA-1 of the uint8 image bytes and shape.
        pred_boxes: The predicted :class:`Boxes` when ``preds`` were detections, else None
            (then ``pred`` is ``"3 boxes"``).
        label_boxes: The ground-truth :class:`Boxes` when ``labels`` were detections.
        pred_mask: The predicted :class:`Mask` when ``preds`` were per-pixel (then ``pred``
            names the classes present).
        label_mask: The true :class:`Mask` when ``labels`` were per-pixel.
        iou: :func:`mask_iou` of the two masks, None unless both are there.
        pred_score: The predicted class's probability as the caller gave it (``pred_scores``),
            or None; class predictions only.
    """

    index: int
    image: np.ndarray = field(repr=False)  # arrays left out of repr: logs stay one line
    activations: np.ndarray = field(repr=False)
    label: Optional[str]
    pred: Optional[str]
    correct: Optional[bool]
    sample_id: str
    pred_boxes: Optional[Boxes] = field(default=None, repr=False)
    label_boxes: Optional[Boxes] = field(default=None, repr=False)
    map_extent: Optional[tuple[float, float]] = None  # see render.overlay (detectors)
    pred_mask: Optional[Mask] = field(default=None, repr=False)
    label_mask: Optional[Mask] = field(default=None, repr=False)
    iou: Optional[float] = None
    pred_score: Optional[float] = None


def sample_id(image_uint8: np.ndarray) -> str:
    """12 hex digits of the SHA-1 of an image's shape and uint8 bytes (C order).

    Args:
        image_uint8: ``(H, W, 3)`` uint8 RGB (any uint8 array is accepted).

    Raises:
        TypeError: A dtype other than uint8 (the id must not depend on float rounding).
    """
    arr = np.asarray(image_uint8)
    if arr.dtype != np.uint8:
        raise TypeError(f"sample_id needs a uint8 image, got dtype {arr.dtype}")
    digest = hashlib.sha1(repr(tuple(int(d) for d in arr.shape)).encode("ascii"))
    digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()[:12]


def _length(x: Any) -> int:
    """Batch length of labels / predictions (a scalar counts as one)."""
    if isinstance(x, (str, bytes)):
        return 1
    if isinstance(x, np.ndarray):
        return 1 if x.ndim == 0 else x.shape[0]
    try:
        return len(x)
    except TypeError:
        return 1


def _decoded(value: Any) -> str:
    """A user's label or class name as text: bytes decoded as UTF-8, anything else ``str``."""
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _from_floats(flat: np.ndarray) -> list[ClassValue]:
    finite = np.isfinite(flat)
    if finite.all() and flat.size and float(flat.min()) >= 0.0 and float(flat.max()) <= 1.0:
        # A single sigmoid output per sample: class 1 above 0.5, as Keras' binary accuracy does.
        return [int(v > 0.5) for v in flat]
    out: list[ClassValue] = []
    for v in flat:
        if np.isfinite(v) and float(v).is_integer():
            out.append(int(v))
        else:
            out.append(f"{float(v):.4g}")  # not a class index; shown as it is
    return out


def class_values(x: Any, batch_size: int, *, name: str = "values") -> list[ClassValue]:
    """Per-sample class values (ints or strings) from labels or predictions of one batch.

    Args:
        x: ``None``; class indices ``(B,)`` / ``(B, 1)``; one-hot, probabilities or logits
            ``(B, ..., K)`` with K > 1 (argmax over the last axis); a float vector or column
            in [0, 1] (binary probability, threshold 0.5); strings or bytes (``(B,)`` array
            or list). A scalar is accepted when ``batch_size`` is 1. A list (or 1-D object
            array) may hold ``None`` for the samples without one.
        batch_size: The number of images in the batch.
        name: Used in error messages (``"labels"``, ``"preds"``).

    Returns:
        ``batch_size`` entries: ``int`` class indices, ``str`` for text and for floats that
        are not class indices, ``None`` where ``x`` (or its entry) is ``None``.

    Raises:
        ValueError: The length differs from ``batch_size``, or more than one value per
            sample remains after the argmax (per-pixel values: see ``segmentation_masks``).
    """
    if x is None:
        return [None] * batch_size
    n = _length(x)
    if n != batch_size:
        raise ValueError(f"{name} have {n} entries but the batch has {batch_size} images")
    if isinstance(x, (str, bytes, bytearray)):
        return [_decoded(x)]
    items = list(x) if isinstance(x, (list, tuple)) or (
        isinstance(x, np.ndarray) and x.dtype == object and x.ndim == 1) else None
    if items is not None and any(v is None for v in items):
        # Unknown for some samples: None there (no class, no right or wrong), the others
        # read as if given alone; never the text "None".
        known = [i for i, v in enumerate(items) if v is not None]
        out: list[ClassValue] = [None] * batch_size
        for i, v in zip(known, class_values([items[i] for i in known], len(known), name=name)):
            out[i] = v
        return out
    if isinstance(x, (list, tuple)) and all(isinstance(v, (str, bytes, bytearray, np.str_, np.bytes_)) for v in x):
        return [_decoded(v) for v in x]

    arr = np.asarray(x)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.dtype.kind in "USO":
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise ValueError(f"{name} of strings must be (B,) or (B, 1), got shape {arr.shape}")
        return [_decoded(v) for v in arr.tolist()]
    if arr.dtype.kind not in "buif":
        raise TypeError(f"{name} must be numbers, strings or bytes, got dtype {arr.dtype}")

    if arr.ndim > 1 and arr.shape[-1] > 1:
        arr = np.argmax(arr, axis=-1)
    if arr.ndim > 1:
        arr = arr.reshape(arr.shape[0], -1)
        if arr.shape[1] != 1:
            raise ValueError(
                f"{name} of shape {np.shape(x)} leave {arr.shape[1]} values per sample; expected one class per sample"
            )
        arr = arr[:, 0]
    if arr.dtype.kind == "f":
        return _from_floats(arr.astype(np.float64))
    return [int(v) for v in arr.tolist()]


def _key(value: Any) -> Any:
    """A hashable key for a mapping entry: integral numbers -> int, text -> str."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (numbers.Integral, np.integer)):
        return int(value)
    if isinstance(value, (numbers.Real, np.floating)) and float(value).is_integer():
        return int(float(value))
    if isinstance(value, (str, bytes, bytearray, np.str_, np.bytes_)):
        return _decoded(value)
    try:
        hash(value)
    except TypeError:
        raise TypeError(f"label_mapping values must be class indices or strings, got {value!r}") from None
    return value


def _invert_mapping(label_mapping: LabelMapping) -> dict[Any, str]:
    """``label_mapping`` in any accepted form -> {class value: display name}."""
    if label_mapping is None:
        return {}
    if isinstance(label_mapping, Mapping):
        items = list(label_mapping.items())
        index_to_name = bool(items) and all(
            isinstance(k, (numbers.Integral, np.integer)) and not isinstance(k, (bool, np.bool_)) and isinstance(v, str)
            for k, v in items
        )
        pairs = [(k, v) for k, v in items] if index_to_name else [(v, k) for k, v in items]
        out: dict[Any, str] = {}
        for value, display in pairs:
            key = _key(value)
            if key in out:
                raise ValueError(
                    f"label_mapping maps {key!r} to both {out[key]!r} and {_decoded(display)!r}; "
                    "each value needs one name"
                )
            out[key] = _decoded(display)
        return out
    if isinstance(label_mapping, (str, bytes)) or not isinstance(label_mapping, Sequence):
        raise TypeError(
            "label_mapping must be a {name: index} dict or a sequence of names, got "
            f"{label_mapping!r} ({type(label_mapping).__name__})"
        )
    return {i: _decoded(display) for i, display in enumerate(label_mapping)}


def _check_n_samples(n_samples: Optional[int]) -> Optional[int]:
    if n_samples is None:
        return None
    if isinstance(n_samples, (bool, np.bool_)) or not isinstance(n_samples, (numbers.Integral, np.integer)):
        raise TypeError(f"n_samples must be a positive int or None, got {n_samples!r} ({type(n_samples).__name__})")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1 or None, got {n_samples!r}")
    return int(n_samples)


class SampleBuffer:
    """Keeps up to ``n_samples`` samples per ``(mode, ds_id)`` across the batches of an epoch.

    Args:
        n_samples: Samples kept per key; ``None`` keeps every sample (memory grows with the
            dataset).
        label_mapping: ``{name: index}``, ``{index: name}`` or a sequence of names; see the
            module docstring.

    Raises:
        TypeError: ``n_samples`` is not an int (or is a bool), or ``label_mapping`` has
            an unusable type.
        ValueError: ``n_samples < 1``, or ``label_mapping`` gives one value two names.
    """

    def __init__(self, n_samples: Optional[int] = 5, label_mapping: LabelMapping = None) -> None:
        self.n_samples = _check_n_samples(n_samples)
        self._names = _invert_mapping(label_mapping)
        self._kept: dict[tuple[str, Optional[str]], list[Sample]] = {}
        # The buffer is filled on the training thread; the lock makes a take() from another
        # thread (e.g. a background writer) safe.
        self._lock = threading.Lock()

    def room(self, mode: str, ds_id: Optional[str]) -> Optional[int]:
        """Samples still wanted for this key this epoch; ``None`` when unlimited."""
        if self.n_samples is None:
            return None
        with self._lock:
            return max(0, self.n_samples - len(self._kept.get((mode, ds_id), ())))

    def keys(self) -> list[tuple[str, Optional[str]]]:
        """The keys holding at least one sample, in the order they were first filled."""
        with self._lock:
            return [k for k, v in self._kept.items() if v]

    def take(self, mode: str, ds_id: Optional[str]) -> list[Sample]:
        """The samples of one key, in the order they were added; the key is cleared."""
        with self._lock:
            return self._kept.pop((mode, ds_id), [])

    def clear(self) -> None:
        """Drop every kept sample."""
        with self._lock:
            self._kept.clear()

    def _display(self, value: ClassValue) -> Optional[str]:
        if value is None:
            return None
        text = str(value)
        # Look up the value, then its text, so {"cat": "3"} still names class index 3.
        return self._names.get(value, self._names.get(text, text))

    def add(
        self,
        mode: str,
        ds_id: Optional[str],
        images_hwc_uint8: np.ndarray,
        activations_nchw: np.ndarray,
        labels: Any = None,
        preds: Any = None,
        *,
        image_layout: Optional[str] = "HWC",
        channels_last: bool = False,
        map_extent: Optional[tuple[float, float]] = None,
        pred_scores: Any = None,
    ) -> list[Sample]:
        """Keep the first rows of a batch while this key has room; copy only those rows.

        Args:
            mode: The mode name (``"train"``, ``"eval"``, ...).
            ds_id: The dataset id, or ``None``.
            images_hwc_uint8: ``(B, H, W, 3)`` uint8 RGB. Other layouts and dtypes that
                ``render.to_rgb_uint8`` accepts are converted, kept rows only, with
                ``image_layout`` (``None`` detects per image).
            activations_nchw: ``(B, C, h, w)``, or ``(B, h, w, C)`` with
                ``channels_last=True``; stored as float32 ``(C, h, w)``.
            labels: See ``class_values``, detections or per-pixel classes (module
                docstring); ``None`` when absent.
            preds: As ``labels``.
            image_layout: Layout of each image in ``images_hwc_uint8``: ``"HWC"``,
                ``"CHW"`` or ``None`` to detect.
            channels_last: Whether the activations are NHWC.
            map_extent: ``(fy, fx)`` fractions of the map the images cover (see
                ``render.overlay``), kept on each sample; None for the whole map.
            pred_scores: ``(B,)`` the predicted class's probability per image, as the caller
                computed it (nothing is recomputed: no softmax here); class predictions
                only. NaN: none for that image.

        Returns:
            The samples kept from this batch (possibly none).

        Raises:
            TypeError: ``mode`` is not a string, or ``ds_id`` neither a string nor None.
            ValueError: A wrong number of dimensions, or batch sizes that differ between
                images, activations, labels and predictions (the message names them).
        """
        if not isinstance(mode, str):
            raise TypeError(f"mode must be a string, got {mode!r} ({type(mode).__name__})")
        if ds_id is not None and not isinstance(ds_id, str):
            raise TypeError(f"ds_id must be a string or None, got {ds_id!r} ({type(ds_id).__name__})")
        images = np.asarray(images_hwc_uint8)
        acts = np.asarray(activations_nchw)
        if images.ndim not in (3, 4):
            raise ValueError(
                f"images must be a batch (B, H, W, C) / (B, C, H, W) / (B, H, W), got shape {images.shape}"
            )
        if acts.ndim != 4:
            axes = "(B, h, w, C)" if channels_last else "(B, C, h, w)"
            raise ValueError(f"activations must be {axes}, got shape {acts.shape}")
        sizes = {"images": images.shape[0], "activations": acts.shape[0]}
        if labels is not None:
            sizes["labels"] = _length(labels)
        if preds is not None:
            sizes["preds"] = _length(preds)
        scores = None
        if pred_scores is not None:
            scores = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
            sizes["pred_scores"] = scores.shape[0]
        if len(set(sizes.values())) > 1:
            raise ValueError("batch sizes differ: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
        batch = images.shape[0]

        with self._lock:
            kept = self._kept.setdefault((mode, ds_id), [])
            room = batch if self.n_samples is None else max(0, self.n_samples - len(kept))
            n = min(room, batch)
            if n == 0:
                if not kept:
                    del self._kept[(mode, ds_id)]
                return []
            # Everything is converted before anything is kept: a batch that fails leaves
            # nothing behind (its inputs are never shown, nor pinned by an integration).
            already_hwc = isinstance(image_layout, str) and image_layout.upper() == "HWC"
            if images.ndim == 4 and images.dtype == np.uint8 and images.shape[-1] == 3 and already_hwc:
                new_images = [np.array(images[i], order="C", copy=True) for i in range(n)]
            else:
                new_images = [to_rgb_uint8(images[i], image_layout if images.ndim == 4 else None) for i in range(n)]
            image_hw = new_images[0].shape[:2]  # per-pixel labels / preds are of this size
            label_boxes = self._boxes(labels, n, "labels")
            pred_boxes = self._boxes(preds, n, "preds")
            label_masks = None if label_boxes is not None else self._masks(labels, n, image_hw, "labels")
            pred_masks = None if pred_boxes is not None else self._masks(preds, n, image_hw, "preds")
            given = [item.get("mask") for item in list(preds)[:n]] if pred_boxes is not None else []
            if given and all(m is not None for m in given):
                # An instance segmenter's: its boxes and, painted by the caller, its mask.
                pred_masks = self._masks(given, n, image_hw, "preds")
                if pred_masks is None:
                    raise ValueError(f"preds' 'mask' must be the images' (H, W) = {tuple(image_hw)} "
                                     "class indices")
            if scores is not None and (pred_boxes is not None or pred_masks is not None):
                raise ValueError("pred_scores are for class predictions (a detection's scores go in "
                                 "its 'scores')")
            label_values = _values(labels, n, label_boxes, label_masks, image_hw, "labels")
            pred_values = _values(preds, n, pred_boxes, pred_masks, image_hw, "preds")
            head = acts[:n]
            if channels_last:
                head = np.moveaxis(head, -1, 1)
            new_acts = np.array(head, dtype=np.float32, order="C", copy=True)

            added: list[Sample] = []
            for i in range(n):
                lv, pv = label_values[i], pred_values[i]
                label_mask = None if label_masks is None else label_masks[i]
                pred_mask = None if pred_masks is None else pred_masks[i]
                # Boxes and masks come as their texts already ("2 boxes", "background, cat").
                label = str(lv) if label_boxes is not None or label_mask is not None else self._display(lv)
                pred = str(pv) if pred_boxes is not None or pred_mask is not None else self._display(pv)
                correct: Optional[bool] = None
                if (label_boxes is not None or pred_boxes is not None or label_mask is not None
                        or pred_mask is not None):
                    pass  # boxes and masks have no single right answer: no mark
                elif label is not None and pred is not None:
                    # Same kind (index vs index, text vs text): compare values; otherwise
                    # compare display names, so a text label matches a mapped index.
                    correct = bool(lv == pv) if type(lv) is type(pv) else label == pred
                iou = None
                if label_mask is not None and pred_mask is not None:
                    iou = mask_iou(pred_mask.classes, label_mask.classes)
                sample = Sample(
                    index=len(kept),
                    image=new_images[i],
                    activations=new_acts[i],
                    label=label,
                    pred=pred,
                    correct=correct,
                    sample_id=sample_id(new_images[i]),
                    pred_boxes=None if pred_boxes is None else pred_boxes[i],
                    label_boxes=None if label_boxes is None else label_boxes[i],
                    map_extent=map_extent,
                    pred_mask=pred_mask,
                    label_mask=label_mask,
                    iou=iou,
                    pred_score=None if scores is None or not np.isfinite(scores[i]) else float(scores[i]),
                )
                kept.append(sample)
                added.append(sample)
            return added

    def retract(self, mode: str, ds_id: Optional[str], samples: Sequence[Sample]) -> None:
        """Take back samples :meth:`add` just kept (a later step of their batch failed), so
        that a batch is kept whole or not at all."""
        with self._lock:
            kept = self._kept.get((mode, ds_id))
            if kept is None:
                return
            drop = {id(s) for s in samples}
            kept[:] = [s for s in kept if id(s) not in drop]
            for i, s in enumerate(kept):
                s.index = i
            if not kept:
                del self._kept[(mode, ds_id)]

    def _masks(self, x: Any, n: int, image_hw: tuple[int, int], name: str) -> Optional[list]:
        """The first ``n`` per-pixel labels / preds of ``x`` as :class:`Mask` (None if ``x``
        is not per-pixel: see :func:`segmentation_masks`)."""
        if x is None:
            return None
        arr = segmentation_masks(_head(x, n), image_hw, name=name)
        if arr is None:
            return None
        out = []
        for classes in arr:
            present = [int(c) for c in np.unique(classes) if c >= 0]
            out.append(Mask(np.array(classes, dtype=np.int32, order="C", copy=True),
                            {c: self._display(c) or str(c) for c in present}))
        return out

    def _boxes(self, x: Any, n: int, name: str) -> Optional[list]:
        """The first ``n`` detections of ``x`` as :class:`Boxes` (None if ``x`` is not boxes)."""
        if not is_detections(x):
            return None
        out = []
        for i, item in enumerate(list(x)[:n]):
            try:
                boxes = np.array(item["boxes"], dtype=np.float64).reshape(-1, 4)
            except (TypeError, ValueError):
                raise ValueError(f"{name}[{i}]['boxes'] must be (n, 4) x1, y1, x2, y2; got "
                                 f"shape {np.shape(item['boxes'])}") from None
            count = boxes.shape[0]
            names: tuple = ("",) * count
            if item.get("labels") is not None:
                values = np.asarray(item["labels"]).reshape(-1)
                if values.shape[0] != count:
                    raise ValueError(f"{name}[{i}] has {count} boxes but {values.shape[0]} labels")
                names = tuple(self._display(_key(v.item() if hasattr(v, "item") else v)) or ""
                              for v in values)
            scores = None
            if item.get("scores") is not None:
                scores = np.array(item["scores"], dtype=np.float64).reshape(-1)
                if scores.shape[0] != count:
                    raise ValueError(f"{name}[{i}] has {count} boxes but {scores.shape[0]} scores")
            out.append(Boxes(boxes, names, scores))
        return out


def _values(x: Any, n: int, boxes: Optional[list], masks: Optional[list],
            image_hw: tuple[int, int], name: str) -> list:
    """Per-sample values of the first ``n`` labels / preds: box counts, mask class names, or
    :func:`class_values`, whose error names the images' size for per-pixel values."""
    if masks is not None:  # a segmenter's boxes and masks: named by the mask's classes
        return [m.text() for m in masks]
    if boxes is not None:
        return [count_text(len(b)) for b in boxes]
    try:
        return class_values(_head(x, n), n, name=name)
    except ValueError as exc:
        if isinstance(x, (list, tuple)) or np.ndim(x) < 3:
            raise
        raise ValueError(f"{exc}; per-pixel {name} must be of the images' size (H, W) = "
                         f"{tuple(int(v) for v in image_hw)}: masks (B, H, W), scores "
                         f"(B, K, H, W) or (B, H, W, K)") from None


def _head(x: Any, n: int) -> Any:
    """The first ``n`` entries of labels / predictions (a scalar or None as is)."""
    if x is None or isinstance(x, (str, bytes, bytearray)):
        return x
    if isinstance(x, np.ndarray) and x.ndim == 0:
        return x
    try:
        return x[:n]
    except TypeError:
        return x
