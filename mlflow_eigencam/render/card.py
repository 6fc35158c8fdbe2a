"""The card: one sample at one epoch, the input and one overlay per component, with text.

The ``n = 1 + k`` panels sit in ``ceil(sqrt(n))`` columns (k=3: 2 x 2; k=1: 2 x 1; k=2: 2 x 2
with an empty cell), each under its title (``"input"``, ``"PC1 62.3%"``), over a two-line
caption (``"true: cat   pred: dog   [X]"``, then the sample id in grey). The geometry follows
from the panel size alone (:func:`card_layout`), so the logger records it with the table
(:func:`card_geometry`) and readers crop panels from it instead of guessing from pixels.

Several layers (``layers=[...]``): one row per layer, ``1 + k`` columns: the input, then the
first layer's components (``"layer1 PC1 41.0%"``); each further row an empty cell, then that
layer's components.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
from PIL import Image, ImageDraw

from ..images import to_rgb_uint8
from .heat import check_alpha, overlay, resolve_colormap
from .text import (BACKGROUND, FONT_SIZE, GAP, MUTED, OK, TEXT, WRONG, clean_text, fit_text,
                   get_font, text_line, text_width)

__all__ = ["card_geometry", "card_layout", "panel_size", "render_card"]

# Card text: a fraction of the panel width (never below FONT_SIZE), so that it stays about
# 10 px tall in MLflow's 256 px preview; each text line gets a band of _LINE_FACTOR * size
# rows (the embedded font's glyphs reach 1.2 * size), so the card's geometry follows from the
# panel size alone, whatever font Pillow has.
_FONT_FRACTION = 0.11
_LINE_FACTOR = 1.25
_CAPTION_LINES = 2
# Between a card's columns: wider than GAP, so that a 2 x 2 card of square panels (taller
# than wide, for its titles and caption) is shown at least 200 px wide in MLflow's preview.
_COL_GAP = 16


def panel_size(height: int, width: int, min_side: int = 128,
               max_side: Optional[int] = 512) -> tuple[int, int]:
    """(height, width) of a card's panels for an image of ``height`` x ``width``: integer
    upscale until the short side >= ``min_side``, capped by ``max_side``."""
    short, long = min(height, width), max(height, width)
    scale: float = 1.0
    if short < min_side:
        scale = float(math.ceil(min_side / short))
    if max_side is not None and long * scale > max_side:
        # Huge panels make huge PNGs in every epoch; the cap wins over min_side.
        scale = max_side / long
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def _resize_image(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    if (h, w) == (height, width):
        return rgb
    if height % h == 0 and width % w == 0 and height // h == width // w:
        f = height // h  # exact integer upscale: crisp pixels, the same on every platform
        return np.repeat(np.repeat(rgb, f, axis=0), f, axis=1)
    # Up: nearest (crisp pixels); down: area averaging (no aliasing).
    resample = Image.Resampling.NEAREST if height > h else Image.Resampling.BOX
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((width, height), resample))


def _check_side(name: str, value: object) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return int(value)


def render_card(
    image: np.ndarray,
    maps: np.ndarray,
    *,
    explained_variance: Union[Sequence[float], np.ndarray, None] = None,
    label: Optional[str] = None,
    pred: Optional[str] = None,
    colormap: Union[str, int] = "jet",
    alpha: float = 0.5,
    min_side: int = 128,
    max_side: Optional[int] = 512,
    correct: Optional[bool] = None,
    sample_id: Optional[str] = None,
    layout: Optional[str] = "HWC",
    map_extent: Optional[tuple[float, float]] = None,
    layer: Optional[str] = None,
    more_layers: Sequence[tuple[str, Any, Any]] = (),
) -> np.ndarray:
    """One sample as a card of panels: the image, then one overlay per component, with captions.

    Layout: see the module docstring; the mark is green or red and repeated as a bar in the
    left margin. The text size is 11% of the panel width (at least 13 px), so it stays
    legible in MLflow's 256 px preview of the card. The caption is left out when there is
    nothing to put on it. Where each panel lands: :func:`card_geometry`.

    Args:
        image: ``(H, W, 3)`` uint8 RGB (any image ``to_rgb_uint8`` accepts with ``layout``).
        maps: ``(k, h, w)`` float maps (k may be 0), e.g. ``EigenCAMResult.maps[i]``.
        explained_variance: ``(k,)`` ratios in [0, 1], shown in percent after each ``PCi``.
        label: True label text, or ``None``.
        pred: Prediction text, or ``None``.
        colormap: See ``overlay``.
        alpha: See ``overlay``.
        min_side: Images whose short side is smaller are upscaled by the smallest integer
            factor (nearest neighbour) that reaches it, so 28x28 digits stay readable.
        max_side: Panels whose long side would exceed this are scaled down to it (this
            wins over ``min_side``); ``None`` for no cap.
        correct: The mark to draw; ``None`` derives it from ``label == pred`` when both are
            given.
        sample_id: Drawn in grey on the caption's second line when given.
        layout: Passed to ``to_rgb_uint8``; ``"HWC"`` because buffered samples are HWC
            (a 4x4 RGB image would otherwise be ambiguous).
        map_extent: See ``overlay``.
        layer: The name of the layer of ``maps``, shown in the titles when ``more_layers``
            are given.
        more_layers: Further layers, one card row each: ``(name, (k', h', w') maps, (k',)
            ratios or None)``.

    Returns:
        ``(H', W', 3)`` uint8 RGB.
    """
    min_side = _check_side("min_side", min_side)
    if max_side is not None and _check_side("max_side", max_side) < min_side:
        raise ValueError(f"max_side ({max_side}) must be >= min_side ({min_side})")
    cmap = resolve_colormap(colormap)
    a = check_alpha(alpha)
    rgb = to_rgb_uint8(image, layout)
    maps_arr = np.asarray(maps)
    if maps_arr.ndim == 2:
        maps_arr = maps_arr[None]
    if maps_arr.ndim != 3:
        raise ValueError(f"maps must be (k, h, w), got shape {maps_arr.shape}")
    k = maps_arr.shape[0]
    ev: Optional[np.ndarray] = None
    if explained_variance is not None:
        ev = np.asarray(explained_variance, dtype=np.float64).reshape(-1)
        if ev.shape[0] != k:
            raise ValueError(f"explained_variance has {ev.shape[0]} values for {k} maps")

    height, width = panel_size(rgb.shape[0], rgb.shape[1], min_side, max_side)
    base = _resize_image(rgb, height, width)
    panels = [base] + [overlay(base, maps_arr[i], colormap=cmap, alpha=a, layout="HWC",
                               map_extent=map_extent) for i in range(k)]
    titles = ["input"] + _titles(k, ev, layer if more_layers else None)
    ks = [k]
    for name, more_maps, more_ev in more_layers:
        m = np.asarray(more_maps)
        if m.ndim != 3:
            raise ValueError(f"maps of layer {name!r} must be (k, h, w), got shape {m.shape}")
        panels += [overlay(base, m[i], colormap=cmap, alpha=a, layout="HWC",
                           map_extent=map_extent) for i in range(m.shape[0])]
        titles += _titles(m.shape[0], None if more_ev is None else
                          np.asarray(more_ev, dtype=np.float64).reshape(-1), str(name))
        ks.append(int(m.shape[0]))

    has_caption = label is not None or pred is not None or sample_id is not None
    if correct is None and label is not None and pred is not None:
        correct = clean_text(label) == clean_text(pred)
    return _draw_card(panels, titles, height, width, label=label, pred=pred, correct=correct,
                      sample_id=sample_id, has_caption=has_caption,
                      cells=_layer_cells(ks) if more_layers else None)


def _titles(k: int, ev: Optional[np.ndarray], layer: Optional[str]) -> list:
    """``["PC1 62.3%", ...]`` (``"layer4 PC1 62.3%"`` with a layer name)."""
    titles = []
    for i in range(k):
        title = f"PC{i + 1}" if layer is None else f"{layer} PC{i + 1}"
        if ev is not None:
            title += f" {ev[i] * 100:.1f}%" if np.isfinite(ev[i]) else " n/a"
        titles.append(title)
    return titles


def _layer_cells(ks: Sequence[int]) -> tuple[list, int]:
    """``(cells, cols)`` of a card of several layers with ``ks[r]`` components each: the input
    in cell 0, layer r's components from cell ``r * cols + 1``, ``cols = 1 + max(ks)``."""
    cols = 1 + max(max(ks), 1)
    cells = [0] + [r * cols + 1 + i for r, k in enumerate(ks) for i in range(k)]
    return cells, cols


def _font_size(panel_width: int) -> int:
    return max(FONT_SIZE, int(round(_FONT_FRACTION * panel_width)))


def _line_band(font_size: int) -> int:
    return int(math.ceil(_LINE_FACTOR * font_size))


def _grid_shape(n_panels: int) -> tuple[int, int]:
    """(columns, rows) of a card of ``n_panels`` panels: ceil(sqrt(n)) columns."""
    cols = max(1, int(math.ceil(math.sqrt(n_panels))))
    return cols, max(1, int(math.ceil(n_panels / cols)))


def card_layout(panel_hw: tuple[int, int], n_panels: int, *, caption: bool = True,
                cells: Optional[tuple[list, int]] = None) -> dict:
    """Geometry of a card, from the panel size alone (no font metrics).

    Args:
        panel_hw: (height, width) of each panel, after scaling.
        n_panels: 1 + k.
        caption: Whether the card has its caption band (two lines) at the bottom.
        cells: ``(cell of each panel, columns)`` (several layers, :func:`_layer_cells`);
            None: panel i in cell i of ``ceil(sqrt(n))`` columns.

    Returns:
        ``{"size": (H, W), "boxes": [(x, y, w, h), ...], "font_size": int, "line": int,
        "cols": int, "rows": int, "caption_top": int}``: the panel boxes in card pixels
        (input first, row by row, columns ``_COL_GAP`` apart), each panel's title in
        the ``line`` rows that end ``GAP`` above its box, the caption's lines from
        ``caption_top``.
    """
    ph, pw = int(panel_hw[0]), int(panel_hw[1])
    cols, rows = _grid_shape(n_panels)
    at = list(range(n_panels))
    if cells is not None:
        at, cols = list(cells[0]), int(cells[1])
        rows = max(at) // cols + 1
    size = _font_size(pw)
    line = _line_band(size)
    row_h = line + GAP + ph + GAP
    boxes = [(GAP + (i % cols) * (pw + _COL_GAP), GAP + (i // cols) * row_h + line + GAP,
              pw, ph) for i in at]
    caption_top = GAP + rows * row_h
    height = caption_top + ((_CAPTION_LINES * line + GAP) if caption else 0)
    width = 2 * GAP + cols * pw + (cols - 1) * _COL_GAP
    return {"size": (height, width), "boxes": boxes, "font_size": size,
            "line": line, "cols": cols, "rows": rows, "caption_top": caption_top}


def card_geometry(image_hw: tuple[int, int], n_components: int, *, min_side: int = 128,
                  max_side: Optional[int] = 512, caption: bool = True,
                  layers: Optional[Sequence[tuple[str, int]]] = None) -> dict[str, Any]:
    """Where :func:`render_card` puts the panels of an image of ``image_hw`` with
    ``n_components`` overlays: what the logger records in each table row (``"card"``).

    Args:
        image_hw: (height, width) of the sample's image, before scaling.
        n_components: k, the overlays after the input.
        min_side: As given to :func:`render_card`.
        max_side: As given to :func:`render_card`.
        caption: Whether the card has a caption (the logger's always has: the sample id).
        layers: Several layers: ``[(name, k), ...]`` in card order (the first is the layer
            of ``n_components``, which is then unused); titles ``"layer4 PC1"``.

    Returns:
        JSON-able ints and strings: ``{"size": [H, W], "boxes": [[x, y, w, h], ...],
        "titles": ["input", "PC1", ...]}``, the card's size and one box per panel in card
        pixels, input first.
    """
    height, width = panel_size(int(image_hw[0]), int(image_hw[1]), min_side, max_side)
    titles = ["input"] + [f"PC{i + 1}" for i in range(int(n_components))]
    cells = None
    if layers:
        titles = ["input"] + [t for name, k in layers for t in _titles(int(k), None, str(name))]
        cells = _layer_cells([int(k) for _, k in layers])
    geo = card_layout((height, width), len(titles), caption=caption, cells=cells)
    return {"size": [int(v) for v in geo["size"]],
            "boxes": [[int(v) for v in box] for box in geo["boxes"]],
            "titles": titles}


def _draw_card(panels: list, titles: list, height: int, width: int, *, label: Optional[str],
               pred: Optional[str], correct: Optional[bool], sample_id: Optional[str],
               has_caption: bool, cells: Optional[tuple[list, int]] = None) -> np.ndarray:
    """A near-square card: panels in ceil(sqrt(n)) columns, each under its title; a two-line
    caption at the bottom (true / pred and the mark, then the sample id in grey)."""
    geo = card_layout((height, width), len(panels), caption=has_caption, cells=cells)
    card_h, card_w = geo["size"]
    line = geo["line"]
    font = get_font(geo["font_size"])
    canvas = Image.new("RGB", (card_w, card_h), BACKGROUND)
    for panel, title, (x, y, w, _h) in zip(panels, titles, geo["boxes"]):
        canvas.paste(Image.fromarray(panel), (x, y))
        text_line(canvas, (x, y - GAP - line), (w, line), [(fit_text(font, title, w), TEXT, 0)], font)
    if not has_caption:
        return np.asarray(canvas, dtype=np.uint8).copy()

    inner = card_w - 2 * GAP
    mark = "" if correct is None else ("[OK]" if correct else "[X]")
    mark_colour = OK if correct else WRONG
    sep = text_width(font, "   ")
    mark_w = text_width(font, mark) if mark else 0
    true_t = None if label is None else f"true: {clean_text(label)}"
    pred_t = None if pred is None else f"pred: {clean_text(pred)}"
    sid = None if sample_id is None else f"id {clean_text(sample_id)}"
    both = "   ".join(t for t in (true_t, pred_t) if t)
    lines: list = [[], []]

    def place(row: int, text: Optional[str], colour: tuple, room: int, x: int) -> int:
        if not text:
            return x
        fitted = fit_text(font, text, max(0, room))
        if fitted:
            lines[row].append((fitted, colour, x))
            x += text_width(font, fitted) + sep
        return x

    def place_mark(row: int, x: int) -> None:
        if mark:
            lines[row].append((mark, mark_colour, x))

    room1 = inner - (mark_w + sep if mark else 0)
    if not both or text_width(font, both) <= room1:
        # Line 1: "true: cat   pred: dog   [X]"; line 2: the sample id.
        place_mark(0, place(0, both, TEXT, room1, 0))
        place(1, sid, MUTED, inner, 0)
    else:
        # Too long for one line: true on line 1; pred, the mark and the id on line 2.
        second = pred_t if true_t is not None else None
        place(0, true_t if true_t is not None else pred_t, TEXT, inner if second else room1, 0)
        if second is None:
            place_mark(0, text_width(font, lines[0][0][0]) + sep if lines[0] else 0)
            place(1, sid, MUTED, inner, 0)
        else:
            sid_w = min(text_width(font, sid), inner // 3) if sid else 0
            x = place(1, second, TEXT, room1 - (sid_w + sep if sid else 0), 0)
            place_mark(1, x)
            if sid:
                fitted = fit_text(font, sid, max(0, inner - x - mark_w - sep))
                if fitted:
                    lines[1].append((fitted, MUTED, inner - text_width(font, fitted)))
    for row, pieces in enumerate(lines):
        text_line(canvas, (GAP, geo["caption_top"] + row * line), (inner, line), pieces, font)
    if mark:
        # A bar in the left margin too, so that mistakes stand out when scanning a grid.
        ImageDraw.Draw(canvas).rectangle([(0, GAP), (GAP - 2, card_h - GAP - 1)],
                                         fill=mark_colour)
    return np.asarray(canvas, dtype=np.uint8).copy()

