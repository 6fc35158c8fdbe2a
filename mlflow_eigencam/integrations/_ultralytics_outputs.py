"""What a YOLO head's output becomes for the core logger: boxes per image, and instance masks
as the semantic class masks the core draws (``samples.Mask``).

The core reads a ``(H, W)`` integer mask at the image's size, class 0 being background
(``samples.BACKGROUND_CLASS``: not drawn, left out of ``localization``'s region). YOLO's
classes start at 0, so YOLO class ``c`` is painted as ``c + 1`` and the names get a
``"background"`` in front (:func:`with_background`). Instances that overlap:

* predicted: painted in rising confidence, so the most confident detection owns a pixel;
* true: painted in falling area, so a small object on a large one stays visible (the order
  of Ultralytics' ``polygons2masks_overlap``, which builds the validator's ``overlap_mask``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

#: The name of class 0 of the logged masks.
BACKGROUND = "background"


def detections(kept: Sequence[torch.Tensor], image_hws: Sequence[Tuple[int, int]],
               offsets: Sequence[Tuple[int, int]]) -> List[Dict[str, np.ndarray]]:
    """Boxes per image from the NMS rows ``kept`` (``(n, 6 + nm)``: xyxy canvas pixels,
    confidence, class, ...): xyxy pixels of the image (its ``(top, left)`` offset in the
    canvas taken off, clipped to its ``(h, w)``), scores and labels."""
    dets = []
    for (h, w), b, (top, left) in zip(image_hws, kept, offsets):
        b = b[:, :6].detach().float().cpu().numpy()
        xyxy = b[:, :4] - np.array([left, top, left, top], dtype=np.float32)
        xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, w)
        xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, h)
        dets.append({"boxes": xyxy, "scores": b[:, 4], "labels": b[:, 5].astype(np.int64)})
    return dets


def obb_hulls(rows: torch.Tensor) -> torch.Tensor:
    """An OBB head's NMS rows as axis-aligned detection rows: the core's boxes are ``(x1, y1,
    x2, y2)`` (``samples.Boxes``), so a rotated box is drawn as the smallest upright box that
    holds its four corners.

    Args:
        rows: ``(n, 7)`` Ultralytics' rotated NMS output: ``cx, cy, w, h`` in canvas pixels,
            confidence, class, angle (radians).

    Returns:
        ``(n, 6)`` float32: ``x1, y1, x2, y2`` (the hull), confidence, class.
    """
    from ultralytics.utils.ops import xywhr2xyxyxyxy

    rows = rows.detach().float()
    if rows.shape[0] == 0:
        return rows.new_zeros((0, 6))
    corners = xywhr2xyxyxyxy(torch.cat([rows[:, :4], rows[:, 6:7]], dim=1))  # (n, 4, 2) xy
    return torch.cat([corners.amin(dim=1), corners.amax(dim=1), rows[:, 4:6]], dim=1)


def proto_of(out: Any) -> Optional[torch.Tensor]:
    """A Segment head's mask prototypes ``(B, nm, mh, mw)`` from its eval-mode output
    ``((y, proto), raw)``; None for other heads."""
    first = out[0] if isinstance(out, (tuple, list)) and out else None
    if not isinstance(first, (tuple, list)) or len(first) < 2:
        return None
    proto = first[1]
    while isinstance(proto, (tuple, list)) and proto:  # a head that also returns semantic logits
        proto = proto[0]
    return proto if isinstance(proto, torch.Tensor) and proto.ndim == 4 else None


def with_background(mapping: Union[Mapping[Any, Any], Sequence[str]]) -> Union[dict, list]:
    """YOLO's class names (a sequence, ``{index: name}`` or ``{name: index}``) shifted by
    one, ``"background"`` taking index 0."""
    if isinstance(mapping, Mapping):
        if all(isinstance(k, int) and isinstance(v, str) for k, v in mapping.items()):
            return {0: BACKGROUND, **{int(k) + 1: v for k, v in mapping.items()}}
        return {BACKGROUND: 0, **{k: int(v) + 1 for k, v in mapping.items()}}
    return [BACKGROUND, *(str(n) for n in mapping)]


def true_mask(segments: Sequence[Any], classes: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    """The true instances' polygons as one class mask.

    Args:
        segments: One polygon per instance, ``(k, 2)`` xy normalised to the image (an
            Ultralytics dataset label's ``"segments"``).
        classes: ``(n,)`` YOLO class per instance.
        hw: The image's ``(h, w)`` in pixels (the pinned image: the model's scale).

    Returns:
        ``(h, w)`` int32: 0 background, ``c + 1`` inside an instance of class ``c``.
    """
    h, w = int(hw[0]), int(hw[1])
    filled: List[Tuple[int, np.ndarray]] = []
    for polygon, c in zip(segments, np.asarray(classes).reshape(-1)):
        xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2) * (w, h)
        if xy.shape[0] < 3:
            continue
        canvas = Image.new("L", (w, h), 0)
        ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in xy], fill=1)
        filled.append((int(c), np.asarray(canvas, dtype=bool)))
    out = np.zeros((h, w), dtype=np.int32)
    for c, inside in sorted(filled, key=lambda item: -int(item[1].sum())):  # large first, small on top
        out[inside] = c + 1
    return out


def predicted_mask(proto: torch.Tensor, rows: torch.Tensor, canvas_hw: Tuple[int, int],
                   offset: Tuple[int, int], image_hw: Tuple[int, int]) -> np.ndarray:
    """The kept detections' masks as one class mask of the image.

    Args:
        proto: ``(nm, mh, mw)`` the Segment head's prototypes for this image.
        rows: ``(n, 6 + nm)`` NMS output: xyxy in canvas pixels, confidence, class, mask
            coefficients.
        canvas_hw: The model input's ``(H, W)``.
        offset: The image's ``(top, left)`` in the canvas (the letterbox), as for its boxes.
        image_hw: The image's ``(h, w)``.

    Returns:
        ``(h, w)`` int32: 0 background, ``c + 1`` where a detection of class ``c`` is the
        most confident one.
    """
    from ultralytics.utils.ops import process_mask

    h, w = int(image_hw[0]), int(image_hw[1])
    top, left = int(offset[0]), int(offset[1])
    out = np.zeros((h, w), dtype=np.int32)
    if rows.shape[0] == 0:
        return out
    rows = rows.detach().float()
    with torch.no_grad():
        # As Ultralytics' predictor draws masks: coefficients x prototypes, upsampled to the
        # input, binarised, cropped to each box; then the letterbox taken off like the boxes'.
        masks = process_mask(proto.float(), rows[:, 6:], rows[:, :4], (int(canvas_hw[0]), int(canvas_hw[1])),
                             upsample=True)
    masks_np = masks[:, top:top + h, left:left + w].cpu().numpy().astype(bool)
    conf = rows[:, 4].cpu().numpy()
    cls = rows[:, 5].cpu().numpy().astype(np.int64)
    for k in np.argsort(conf, kind="stable"):  # rising confidence: the most confident paints last
        out[masks_np[k]] = int(cls[k]) + 1
    return out
