"""Segmentation masks: outlines and a light fill on an image, and a segmenter's card.

A mask here is ``(H, W)`` integer class indices (-1: ignored) with a name per class, as
``samples.Mask`` keeps it. Class 0 (``samples.BACKGROUND_CLASS``) is never drawn: the
outlines and the fill show the objects. A class gets the colour its name gets as a box
(:func:`.boxes.box_colour`), so a "cat" is the same colour in every run and task.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import numpy as np
from PIL import Image

from ..images import to_rgb_uint8
from ..samples import BACKGROUND_CLASS
from .boxes import TRUTH_BOX_COLOUR, box_colour, draw_boxes
from .card import card_geometry, card_layout, panel_size, render_card
from .text import GAP, MUTED, TEXT, clean_text, fit_text, get_font, text_line, text_width

__all__ = ["MASK_FILL_ALPHA", "TRUTH_MASK_COLOUR", "draw_mask", "render_segmentation_card"]

#: Opacity of the predicted mask's fill on the input panel: light, so the image shows through.
MASK_FILL_ALPHA = 0.35
#: The true mask's outlines: white, as true boxes.
TRUTH_MASK_COLOUR = TRUTH_BOX_COLOUR


def _mask_parts(mask: object) -> tuple[np.ndarray, dict[int, str]]:
    """``((H, W) int classes, {class: name})`` from an ``(H, W)`` array, a ``(classes,
    names)`` tuple or an object with ``.classes`` / ``.names`` (``samples.Mask``)."""
    if hasattr(mask, "classes"):
        classes, names = mask.classes, getattr(mask, "names", None)
    elif isinstance(mask, tuple) and len(mask) == 2:
        classes, names = mask
    else:
        classes, names = mask, None
    arr = np.asarray(classes)
    if arr.ndim != 2 or arr.dtype.kind not in "biu":
        raise ValueError(f"a mask must be (H, W) integer class indices, got shape {arr.shape} "
                         f"and dtype {arr.dtype}")
    named = {int(k): clean_text(v) for k, v in (names or {}).items()} if isinstance(
        names, (Mapping, type(None))) else {i: clean_text(v) for i, v in enumerate(names)}
    return arr.astype(np.int32, copy=False), named


def _outline(inside: np.ndarray, thickness: int) -> np.ndarray:
    """The ``thickness`` pixels of a region next to its edge (not the image's border)."""
    t = max(1, int(thickness))
    # Eroded by a (2t+1)-square (t passes of a 3 x 3 one) with the border replicated, so a
    # region touching the image's edge is not outlined along that edge (the object goes on
    # out of the picture). Separable: a row-wise then a column-wise minimum.
    padded = np.pad(inside, t, mode="edge")
    h, w = inside.shape
    rows = np.logical_and.reduce([padded[:, i:i + w] for i in range(2 * t + 1)])
    core = np.logical_and.reduce([rows[i:i + h, :] for i in range(2 * t + 1)])
    return inside & ~core


def draw_mask(
    image: np.ndarray,
    mask: object,
    *,
    colour: Optional[tuple[int, int, int]] = None,
    thickness: int = 2,
    fill: float = 0.0,
) -> np.ndarray:
    """Draw a mask's outlines (and optionally a light fill) on a copy of an image.

    Args:
        image: ``(H', W', 3)`` uint8 RGB; the mask is resized to it (nearest neighbour).
        mask: ``(H, W)`` integer classes (-1 ignored), a ``(classes, names)`` tuple, or an
            object with those attributes (``samples.Mask``). Class 0 (background) and
            ignored pixels are not drawn.
        colour: One RGB colour for every class; None colours each class by its name.
        thickness: Outline width in pixels of ``image``.
        fill: Opacity in [0, 1] of a fill in each class's colour (0: outlines only).

    Returns:
        ``(H', W', 3)`` uint8 RGB.
    """
    rgb = to_rgb_uint8(image, "HWC")
    classes, names = _mask_parts(mask)
    height, width = rgb.shape[:2]
    if classes.shape != (height, width):
        # Nearest neighbour: output pixel i takes source pixel floor(i * n_in / n_out).
        ys = np.minimum((np.arange(height) * classes.shape[0]) // height, classes.shape[0] - 1)
        xs = np.minimum((np.arange(width) * classes.shape[1]) // width, classes.shape[1] - 1)
        classes = classes[ys[:, None], xs[None, :]]
    out = rgb.copy()
    for c in np.unique(classes):
        if c < 0 or c == BACKGROUND_CLASS:
            continue
        inside = classes == c
        paint = np.array(colour if colour is not None else box_colour(names.get(int(c), str(int(c)))),
                         dtype=np.float32)
        if fill > 0:
            blended = (1.0 - fill) * out[inside].astype(np.float32) + fill * paint
            out[inside] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        out[_outline(inside, thickness)] = paint.astype(np.uint8)
    return out


def _caption(iou: Optional[float], label: Optional[str], pred: Optional[str],
             sample_id: Optional[str]) -> list:
    """The caption's two lines as ``(text, colour, right-aligned)`` pieces: ``IoU 0.63`` and
    the true class names, then the predicted ones and the sample id."""
    first = [] if iou is None else [(f"IoU {iou:.2f}", TEXT, False)]
    if label is not None:
        first.append((f"true: {clean_text(label)}", TEXT, False))
    second = [] if pred is None else [(f"pred: {clean_text(pred)}", TEXT, False)]
    if sample_id is not None:
        second.append((f"id {clean_text(sample_id)}", MUTED, True))
    return [first, second]


def _draw_caption(card: np.ndarray, lines: list, geo: dict) -> np.ndarray:
    """Draw the caption's lines into the card's caption band (``card_layout``'s geometry):
    pieces left to right, the right-aligned one (the id) in at most a third of the width."""
    font = get_font(geo["font_size"])
    inner = geo["size"][1] - 2 * GAP
    sep = text_width(font, "   ")
    canvas = Image.fromarray(card)
    for row, pieces in enumerate(lines):
        right = [p for p in pieces if p[2]]
        right_w = min(text_width(font, right[0][0]), inner // 3) if right else 0
        placed, x = [], 0
        for text, colour, _ in (p for p in pieces if not p[2]):
            fitted = fit_text(font, text, max(0, inner - x - (right_w + sep if right else 0)))
            if not fitted:
                break
            placed.append((fitted, colour, x))
            x += text_width(font, fitted) + sep
        if right:
            fitted = fit_text(font, right[0][0], max(0, inner - x))
            if fitted:
                placed.append((fitted, right[0][1], inner - text_width(font, fitted)))
        text_line(canvas, (GAP, geo["caption_top"] + row * geo["line"]), (inner, geo["line"]),
                  placed, font)
    return np.asarray(canvas, dtype=np.uint8).copy()


def render_segmentation_card(
    image: np.ndarray,
    maps: np.ndarray,
    *,
    pred_mask: object = None,
    true_mask: object = None,
    iou: Optional[float] = None,
    label: Optional[str] = None,
    pred: Optional[str] = None,
    pred_boxes: object = None,
    min_side: int = 128,
    max_side: Optional[int] = 512,
    layout: Optional[str] = "HWC",
    **card_kwargs: object,
) -> np.ndarray:
    """:func:`render_card`, then the masks drawn on its panels and a caption of their own.

    The input panel shows the predicted mask as a light fill with outlines, in a colour per
    class, and the true mask as thin white outlines; each overlay shows the true mask's
    outlines (the predicted ones when there is no true mask), so the heat map can be read
    against the object. The caption reads ``IoU 0.63   true: background, cat``, then
    ``pred: background, cat, dog`` and the sample id in grey (class names as ``label`` /
    ``pred`` give them), with no right / wrong mark.

    Args:
        image: As for :func:`render_card`; the masks are of its ``(H, W)``.
        maps: ``(k, h, w)`` maps.
        pred_mask: A mask as :func:`draw_mask` takes it, or None.
        true_mask: A mask as :func:`draw_mask` takes it, or None.
        iou: The masks' agreement (``samples.mask_iou``), or None.
        label: The true classes' text, or None.
        pred: The predicted classes' text, or None.
        pred_boxes: An instance segmenter's boxes as :func:`~.boxes.draw_boxes` takes them,
            drawn over the masks on every panel (``"name score"`` on the input panel), or None.
        min_side: Passed to :func:`render_card`.
        max_side: Passed to :func:`render_card`.
        layout: Passed to :func:`render_card`.
        **card_kwargs: Passed to :func:`render_card` (``correct`` is ignored).

    Returns:
        ``(H', W', 3)`` uint8 RGB, the size of ``render_card``'s card.
    """
    card_kwargs.pop("correct", None)
    sample_id = card_kwargs.pop("sample_id", None)
    lines = _caption(iou, label, pred, None if sample_id is None else str(sample_id))
    captioned = any(lines)
    # render_card draws the panels and their titles; pred="" makes it keep its caption band,
    # whose two lines are drawn here over what it wrote there.
    card = render_card(image, maps, min_side=min_side, max_side=max_side, layout=layout,
                       pred="" if captioned else None, **card_kwargs)  # type: ignore[arg-type]
    rgb_hw = to_rgb_uint8(image, layout).shape[:2]
    for name, m in (("pred_mask", pred_mask), ("true_mask", true_mask)):
        if m is not None and _mask_parts(m)[0].shape != tuple(rgb_hw):
            raise ValueError(f"{name} must be the image's (H, W) = {tuple(rgb_hw)}, got shape "
                             f"{_mask_parts(m)[0].shape}")
    k = np.asarray(maps).shape[0] if np.asarray(maps).ndim == 3 else 1
    boxes = card_geometry(rgb_hw, k, min_side=min_side, max_side=max_side)["boxes"]
    for i, (x, y, w, h) in enumerate(boxes):
        panel = card[y:y + h, x:x + w]
        if i == 0 and pred_mask is not None:
            panel = draw_mask(panel, pred_mask, thickness=2, fill=MASK_FILL_ALPHA)
        if true_mask is not None:
            panel = draw_mask(panel, true_mask, colour=TRUTH_MASK_COLOUR, thickness=1)
        elif i > 0 and pred_mask is not None:
            panel = draw_mask(panel, pred_mask, thickness=1)
        if pred_boxes is not None:
            panel = draw_boxes(panel, pred_boxes, scale=(w / rgb_hw[1], h / rgb_hw[0]), text=i == 0)
        card[y:y + h, x:x + w] = panel
    if captioned:
        ph, pw = panel_size(rgb_hw[0], rgb_hw[1], min_side, max_side)
        card = _draw_caption(card, lines, card_layout((ph, pw), 1 + k, caption=True))
    return card
