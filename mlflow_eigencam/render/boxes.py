"""Detection boxes: drawn on an image, and on every panel of a detector's card."""

from __future__ import annotations

import zlib
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from ..images import to_rgb_uint8
from .card import card_geometry, render_card
from .text import FONT_SIZE, clean_text, fit_text, get_font, line_height, text_width

__all__ = ["MAX_DRAWN_BOXES", "TRUTH_BOX_COLOUR", "box_colour", "draw_boxes", "render_detection_card"]

#: Most boxes drawn per panel, highest scores first (a detector at random init returns
#: hundreds); captions and the table still count every box.
MAX_DRAWN_BOXES = 20
#: Ground-truth boxes: white, thin, under the predictions.
TRUTH_BOX_COLOUR = (255, 255, 255)
# Distinct, saturated colours; a class name always gets the same one (CRC-32 of the name).
_BOX_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
)


def box_colour(name: object) -> tuple[int, int, int]:
    """The RGB colour of a class name's boxes (the same name, the same colour, in every run)."""
    return _BOX_PALETTE[zlib.crc32(clean_text(name).encode("utf-8")) % len(_BOX_PALETTE)]


def _box_parts(boxes: object) -> tuple[np.ndarray, list, Optional[np.ndarray]]:
    """``(xyxy (n, 4) float64, names, scores or None)`` from an ``(n, 4)`` array, a
    ``(boxes, names, scores)`` tuple or an object with ``.boxes/.names/.scores``."""
    if hasattr(boxes, "boxes"):
        xyxy, names, scores = boxes.boxes, getattr(boxes, "names", None), getattr(boxes, "scores", None)
    elif isinstance(boxes, tuple) and len(boxes) == 3:
        xyxy, names, scores = boxes
    else:
        xyxy, names, scores = boxes, None, None
    arr = np.asarray(xyxy, dtype=np.float64)
    if arr.size == 0:
        arr = arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must be (n, 4) x1, y1, x2, y2, got shape {arr.shape}")
    n = arr.shape[0]
    name_list = [""] * n if names is None else [clean_text(v) for v in names]
    score_arr = None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(name_list) != n or (score_arr is not None and score_arr.shape[0] != n):
        raise ValueError(f"{n} boxes need {n} names and scores, got {len(name_list)} and "
                         f"{None if score_arr is None else score_arr.shape[0]}")
    return arr, name_list, score_arr


def draw_boxes(
    image: np.ndarray,
    boxes: object,
    *,
    scale: tuple[float, float] = (1.0, 1.0),
    colour: Optional[tuple[int, int, int]] = None,
    thickness: int = 2,
    text: bool = True,
    max_boxes: int = MAX_DRAWN_BOXES,
) -> np.ndarray:
    """Draw boxes on a copy of an image.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        boxes: ``(n, 4)`` float ``(x1, y1, x2, y2)``, a ``(boxes, names, scores)`` tuple, or
            an object with those attributes (``samples.Boxes``); coordinates are pixels of
            the source image, mapped here by ``scale``.
        scale: ``(sx, sy)`` from source pixels to ``image`` pixels.
        colour: One RGB colour for every box; None colours each box by its class name.
        thickness: Outline width in pixels.
        text: Write ``"name 0.87"`` (name, score) on a filled tab at each box's top left.
        max_boxes: Only the highest-scoring ``max_boxes`` are drawn (the first ones without
            scores); the best is drawn last, on top.

    Returns:
        ``(H, W, 3)`` uint8 RGB; boxes outside the image are clipped to it.
    """
    rgb = to_rgb_uint8(image, "HWC")
    xyxy, names, scores = _box_parts(boxes)
    order = np.arange(xyxy.shape[0]) if scores is None else np.argsort(-scores, kind="stable")
    order = order[: max(0, int(max_boxes))][::-1]
    if order.size == 0:
        return rgb
    sx, sy = float(scale[0]), float(scale[1])
    height, width = rgb.shape[:2]
    canvas = Image.fromarray(rgb)
    draw = ImageDraw.Draw(canvas)
    font = get_font(FONT_SIZE - 2)
    line_h = line_height(font)
    for i in order:
        x1, y1, x2, y2 = xyxy[i]
        if not np.all(np.isfinite(xyxy[i])):
            continue
        left = int(np.clip(round(min(x1, x2) * sx), 0, width - 1))
        right = int(np.clip(round(max(x1, x2) * sx) - 1, 0, width - 1))
        top = int(np.clip(round(min(y1, y2) * sy), 0, height - 1))
        bottom = int(np.clip(round(max(y1, y2) * sy) - 1, 0, height - 1))
        fill = colour if colour is not None else box_colour(names[i])
        draw.rectangle([(left, top), (max(left, right), max(top, bottom))], outline=fill,
                       width=max(1, int(thickness)))
        if text:
            label = names[i] + (f" {scores[i]:.2f}" if scores is not None else "")
            label = fit_text(font, label.strip(), max(0, width - left - 2))
            if label:
                tab_top = top - line_h - 2 if top - line_h - 2 >= 0 else top
                tab_w = text_width(font, label) + 4
                draw.rectangle([(left, tab_top), (min(width - 1, left + tab_w), tab_top + line_h + 1)],
                               fill=fill)
                dark = sum(fill) < 380  # white text on dark tabs, black on light ones
                draw.text((left + 2, tab_top), label, fill=(255, 255, 255) if dark else (0, 0, 0),
                          font=font)
    return np.asarray(canvas, dtype=np.uint8).copy()

def render_detection_card(
    image: np.ndarray,
    maps: np.ndarray,
    *,
    pred_boxes: object = None,
    true_boxes: object = None,
    min_side: int = 128,
    max_side: Optional[int] = 512,
    layout: Optional[str] = "HWC",
    **card_kwargs: object,
) -> np.ndarray:
    """:func:`render_card`, then the boxes drawn on every panel.

    Predicted boxes are coloured by class, with ``"name score"`` written on the input panel;
    ground-truth boxes are thin white outlines beneath them. The caption reads
    ``"pred: 6 boxes, true: 2 boxes"`` (the logger passes the counts as ``pred`` / ``label``),
    with no right / wrong mark: a set of boxes has no single right answer.

    Args:
        image: As for :func:`render_card`; the boxes are in its pixels.
        maps: ``(k, h, w)`` maps.
        pred_boxes: Boxes as :func:`draw_boxes` takes them, or None.
        true_boxes: Boxes as :func:`draw_boxes` takes them, or None.
        min_side: Passed to :func:`render_card`.
        max_side: Passed to :func:`render_card`.
        layout: Passed to :func:`render_card`.
        **card_kwargs: Passed to :func:`render_card` (``label`` and ``pred`` become the
            caption described above; ``correct`` is ignored).

    Returns:
        ``(H', W', 3)`` uint8 RGB, the size of ``render_card``'s card.
    """
    label, pred = card_kwargs.pop("label", None), card_kwargs.pop("pred", None)
    card_kwargs.pop("correct", None)
    # One caption field, so render_card draws no [OK] / [X] from label != pred.
    text = ", ".join(t for t in (None if pred is None else str(pred),
                                  None if label is None else f"true: {label}") if t)
    card = render_card(image, maps, min_side=min_side, max_side=max_side, layout=layout,
                       pred=text or None, **card_kwargs)  # type: ignore[arg-type]
    rgb_hw = to_rgb_uint8(image, layout).shape[:2]
    k = np.asarray(maps).shape[0] if np.asarray(maps).ndim == 3 else 1
    boxes = card_geometry(rgb_hw, k, min_side=min_side, max_side=max_side)["boxes"]
    for i, (x, y, w, h) in enumerate(boxes):
        scale = (w / rgb_hw[1], h / rgb_hw[0])
        panel = card[y:y + h, x:x + w]
        if true_boxes is not None:
            panel = draw_boxes(panel, true_boxes, scale=scale, colour=TRUTH_BOX_COLOUR,
                               thickness=1, text=False)
        if pred_boxes is not None:
            panel = draw_boxes(panel, pred_boxes, scale=scale, text=i == 0)
        card[y:y + h, x:x + w] = panel
    return card
