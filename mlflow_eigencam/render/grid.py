"""The epoch grid: an epoch's cards under one header, ``GRID_COLUMNS`` per row."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageDraw

from .. import _layout
from .png import PNGBand
from .text import BACKGROUND, GAP, RULE, TEXT, clean_text, get_font, line_height, text_width

__all__ = ["GRID_COLUMNS", "grid_bands", "render_grid"]

#: Cards side by side in an epoch's grid.
GRID_COLUMNS = 4
_ROW_GAP = 8  # between cards in a grid
_HEADER_FONT_SIZE = 16


def render_grid(
    cards: Sequence[np.ndarray],
    *,
    epoch: int,
    mode: str,
    ds_id: Optional[str],
) -> np.ndarray:
    """Lay cards out under a header ``"epoch 3 | mode eval | ds_id ds1"``, up to
    ``GRID_COLUMNS`` (4) per row, in order, left to right then top to bottom.

    Args:
        cards: ``(H_i, W_i, 3)`` uint8 images (from ``render_card``). Each sits at the top
            left of a cell as wide as the widest and as tall as the tallest of its row, white
            around it; thin rules separate the cells.
        epoch: Shown in the header.
        mode: Shown in the header.
        ds_id: Shown in the header (``all`` for None, as in the paths).

    Returns:
        ``(H', W', 3)`` uint8 RGB.

    Raises:
        ValueError: No cards, or a card that is not ``(H, W, 3)`` uint8.
    """
    bands = grid_bands(cards, epoch=epoch, mode=mode, ds_id=ds_id)
    return np.concatenate([b.pixels for b in bands], axis=0)


def grid_bands(
    cards: Sequence[Union[np.ndarray, PNGBand]],
    *,
    epoch: int,
    mode: str,
    ds_id: Optional[str],
) -> list[PNGBand]:
    """:func:`render_grid` as horizontal bands, top to bottom: the header, row 0 of cards, a
    gap, row 1, ..., a bottom row; :func:`encode_png` writes them as one PNG. Cards may be
    given as :class:`PNGBand` (their pixels are used: cards side by side share scanlines, so
    a card's compressed rows cannot be reused here)."""
    if len(cards) == 0:
        raise ValueError("render_grid needs at least one card, got none")
    pixels = []
    for i, card in enumerate(cards):
        s = card.pixels if isinstance(card, PNGBand) else np.asarray(card)
        if s.ndim != 3 or s.shape[2] != 3 or s.dtype != np.uint8:
            raise ValueError(f"card {i} must be (H, W, 3) uint8, got shape {s.shape} dtype {s.dtype}")
        pixels.append(s)

    font = get_font(_HEADER_FONT_SIZE)
    header = f"epoch {epoch} | mode {clean_text(mode)}"
    header += f" | ds_id {clean_text(_layout.ds_label(ds_id))}"
    line_h = line_height(font)
    header_h = GAP + line_h + GAP
    per_row = min(GRID_COLUMNS, len(pixels))
    cell_w = max(c.shape[1] for c in pixels)
    width = max(per_row * cell_w + (per_row - 1) * _ROW_GAP, text_width(font, header) + 2 * GAP)

    head = Image.new("RGB", (width, header_h), BACKGROUND)
    draw = ImageDraw.Draw(head)
    draw.text((GAP, GAP), header, fill=TEXT, font=font)
    draw.line([(0, header_h - 1), (width - 1, header_h - 1)], fill=RULE)
    gap = np.full((_ROW_GAP, width, 3), BACKGROUND, np.uint8)
    gap[_ROW_GAP - _ROW_GAP // 2 - 1] = RULE  # a rule in the middle of the gap
    gap_band = PNGBand(gap)
    bands = [PNGBand(np.asarray(head, dtype=np.uint8))]
    for r in range(0, len(pixels), per_row):
        row = pixels[r:r + per_row]
        band = np.full((max(c.shape[0] for c in row), width, 3), BACKGROUND, np.uint8)
        for c, img in enumerate(row):
            x = c * (cell_w + _ROW_GAP)
            band[: img.shape[0], x:x + img.shape[1]] = img
            if c:  # a rule in the middle of the gap before the card
                band[:, x - _ROW_GAP // 2 - 1] = RULE
        if r:
            bands.append(gap_band)
        bands.append(PNGBand(band))
    bands.append(PNGBand(np.full((1, width, 3), BACKGROUND, np.uint8)))
    return bands
