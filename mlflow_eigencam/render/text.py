"""Text on cards, grids and comparisons: Pillow's built-in font, fitting, one-line cleaning.

Text uses Pillow's built-in font (``ImageFont.load_default``), which needs no file or network;
with Pillow >= 10.1 and FreeType it is a scalable embedded font, otherwise the small bitmap
font. Marks are ASCII (``[OK]`` / ``[X]``, coloured) because the bitmap font has no
check-mark glyphs.
"""

from __future__ import annotations

import functools
import math
from typing import Union

from PIL import Image, ImageDraw, ImageFont

__all__ = ["BACKGROUND", "FONT_SIZE", "GAP", "MUTED", "OK", "RULE", "TEXT", "WRONG", "clean_text",
           "fit_text", "get_font", "line_height", "text_line", "text_width"]

#: Colours (RGB) shared by cards, grids and comparisons.
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MUTED = (110, 110, 110)
OK = (0, 130, 0)
WRONG = (200, 0, 0)
RULE = (210, 210, 210)
#: Pixels between panels and around a card.
GAP = 4
#: The smallest text size, in pixels.
FONT_SIZE = 13

#: What get_font returns: FreeType when Pillow has it (>= 10.1), else the bitmap font.
Font = Union[ImageFont.ImageFont, ImageFont.FreeTypeFont]


@functools.lru_cache(maxsize=8)
def get_font(size: int) -> Font:
    """Pillow's built-in font: embedded FreeType font when available, bitmap font otherwise."""
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1; no file, no network
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


# Cached: captions repeat (labels, sample ids, "input") every epoch and measuring text is a
# large share of drawing a card. Fonts come from get_font's cache, so they hash stably.
@functools.lru_cache(maxsize=4096)
def text_width(font: Font, text: str) -> int:
    """Width of ``text`` in pixels."""
    left, _, right, _ = font.getbbox(text)
    return int(math.ceil(right - left))


@functools.lru_cache(maxsize=8)
def line_height(font: Font) -> int:
    """Height of one line of ``font`` in pixels, the same for every text."""
    # Measured on glyphs with ascenders and descenders so that every line gets the same height.
    _, top, _, bottom = font.getbbox("Ag|y[]%")
    return int(math.ceil(bottom)) + max(0, -int(top))


def fit_text(font: Font, text: str, width: int) -> str:
    """``text``, shortened with '...' until it fits ``width`` pixels."""
    if text_width(font, text) <= width:
        return text
    for end in range(len(text) - 1, -1, -1):
        candidate = text[:end].rstrip() + "..."
        if text_width(font, candidate) <= width:
            return candidate
    return ""


def clean_text(text: object) -> str:
    """``str(text)`` on one line, runs of whitespace as one space."""
    # One line: newlines or tabs in a class name would break the caption's layout.
    return " ".join(str(text).split())


def text_line(canvas: Image.Image, xy: tuple[int, int], size: tuple[int, int],
              pieces: list, font: Font) -> None:
    """Draw ``[(text, colour, x offset), ...]`` in ``font`` on a white band of ``size`` (w, h) pasted at
    ``xy``: text never leaves its band, whatever the font's real height."""
    # Cached: titles ("input", "PC1 62.3%") and captions repeat across samples and epochs,
    # and FreeType rendering at a card's font size was a sixth of the epoch end.
    key = (size, tuple(pieces), getattr(font, "size", None))  # the font is get_font(size)
    band = _TEXT_BANDS.get(key)
    if band is None:
        band = Image.new("RGB", size, BACKGROUND)
        draw = ImageDraw.Draw(band)
        for text, colour, dx in pieces:
            if text:
                draw.text((dx, 0), text, fill=colour, font=font)
        global _TEXT_BYTES
        if _TEXT_BYTES > _TEXT_CACHE_BYTES:  # unique lines (sample ids) must not pile up
            _TEXT_BANDS.clear()
            _TEXT_BYTES = 0
        _TEXT_BANDS[key] = band
        _TEXT_BYTES += 3 * size[0] * size[1]
    canvas.paste(band, xy)


_TEXT_BANDS: dict = {}
_TEXT_BYTES = 0
# A 224 px card's caption line is ~45 kB of RGB and a 512 px one ~225 kB: bound the cache
# by bytes, not by count.
_TEXT_CACHE_BYTES = 16 * 2**20
