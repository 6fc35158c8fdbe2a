"""PNG bytes written here (fast, deterministic, reusable bands) and MLflow's WebP preview."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
from PIL import Image

__all__ = ["PNGBand", "PREVIEW_SIZE", "encode_png", "encode_webp_preview"]

class PNGBand:
    """Rows of an image whose PNG scanlines are compressed at most once.

    A card is logged alone and again inside the epoch's grid; as a band its compressed rows
    serve both PNGs. Each band starts with an unfiltered row and is deflated on its own
    (byte-aligned, no back-references across bands), so bands concatenate into one valid
    zlib stream.

    Args:
        pixels: ``(H, W, 3)`` or ``(H, W)`` uint8, H and W > 0.
    """

    __slots__ = ("_deflated", "pixels")

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = _check_pixels(pixels, "encode_png")
        self._deflated: Optional[tuple[bytes, int, int]] = None

    def deflated(self) -> tuple[bytes, int, int]:
        """(raw deflate segment, adler32 of the scanlines, their length in bytes)."""
        if self._deflated is None:
            rows = self.pixels.reshape(self.pixels.shape[0], -1)
            scanlines = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
            scanlines[:, 0] = 2  # filter type Up: each byte minus the byte above, modulo 256
            scanlines[0, 0] = 0  # a band's first row is not filtered: bands stay independent
            scanlines[0, 1:] = rows[0]
            np.subtract(rows[1:], rows[:-1], out=scanlines[1:, 1:])
            data = scanlines.tobytes()
            deflate = zlib.compressobj(1, zlib.DEFLATED, -15)  # level 1, raw deflate
            segment = deflate.compress(data) + deflate.flush(zlib.Z_SYNC_FLUSH)
            self._deflated = (segment, zlib.adler32(data), len(data))
        return self._deflated


def encode_png(image: Union[np.ndarray, Sequence[PNGBand]]) -> bytes:
    """PNG bytes of ``(H, W, 3)`` or ``(H, W)`` uint8, or of bands stacked top to bottom;
    equal pixels give equal bytes.

    Written here rather than by Pillow because this runs beside the user's training on every
    epoch: rows use PNG's "Up" filter (a vectorised row difference) and zlib level 1. On
    176 x 532 images and 940 x 532 grids that is 2.2x faster than Pillow at level 1 and the
    files are no larger (Pillow tries five filters per row); bands (see :class:`PNGBand`)
    let a grid reuse its cards' compressed rows. No timestamp or text chunks, so the bytes
    depend only on the pixels (and the zlib build).

    Raises:
        TypeError: A dtype other than uint8.
        ValueError: Another shape, an empty image, or bands of different widths.
    """
    bands = [PNGBand(image)] if isinstance(image, np.ndarray) else list(image)
    if not bands:
        raise ValueError("encode_png needs an image or at least one band")
    first = bands[0].pixels
    for band in bands[1:]:
        if band.pixels.shape[1:] != first.shape[1:]:
            raise ValueError(f"bands must share width and channels: {band.pixels.shape} vs "
                             f"{first.shape}")
    height = sum(b.pixels.shape[0] for b in bands)
    colour_type = 2 if first.ndim == 3 else 0  # truecolour or greyscale, 8 bits per sample
    header = struct.pack(">IIBBBBB", first.shape[1], height, 8, colour_type, 0, 0, 0)
    segments, adler = [], 1
    for band in bands:
        segment, band_adler, length = band.deflated()
        segments.append(segment)
        adler = _adler32_combine(adler, band_adler, length)
    # zlib stream: header (deflate, 32 KiB window, level "fastest"), the bands, an empty final
    # block, the Adler-32 of all scanlines.
    stream = b"".join([b"\x78\x01", *segments, b"\x03\x00", struct.pack(">I", adler)])
    return b"".join((b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", header),
                     _png_chunk(b"IDAT", stream), _png_chunk(b"IEND", b"")))


def _adler32_combine(adler1: int, adler2: int, len2: int) -> int:
    """Adler-32 of A + B from those of A and B and B's length (zlib's adler32_combine)."""
    base = 65521
    rem = len2 % base
    sum1 = adler1 & 0xFFFF
    sum2 = (rem * sum1) % base
    sum1 = (sum1 + (adler2 & 0xFFFF) + base - 1) % base
    sum2 = (sum2 + ((adler1 >> 16) & 0xFFFF) + ((adler2 >> 16) & 0xFFFF) + base - rem) % base
    return sum1 | (sum2 << 16)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def _check_pixels(image: np.ndarray, who: str) -> np.ndarray:
    """``image`` as an array if it is non-empty (H, W, 3) or (H, W) uint8, else an error that
    names ``who`` and the bad dtype or shape."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"{who} needs uint8 pixels, got dtype {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)) or 0 in arr.shape:
        raise ValueError(f"{who} needs (H, W, 3) or (H, W) with H, W > 0, got shape "
                         f"{arr.shape}")
    return arr


#: Longer side of the preview MLflow's UI loads for an image series (MLflow's own constant).
PREVIEW_SIZE = 256


def encode_webp_preview(image: np.ndarray, max_size: int = PREVIEW_SIZE) -> bytes:
    """WebP preview of ``(H, W, 3)`` or ``(H, W)`` uint8: the file MLflow's UI shows for an
    image series, scaled as ``log_image`` scales it (longer side ``max_size``, aspect kept).

    WebP method 0: 3.6x faster than Pillow's default method for ~15% more bytes on a card.

    Raises:
        TypeError: A dtype other than uint8.
        ValueError: Another shape.
    """
    arr = _check_pixels(image, "encode_webp_preview")
    height, width = arr.shape[:2]
    if width > height:
        size = (max_size, max(1, int(height * max_size / width)))
    else:
        size = (max(1, int(width * max_size / height)), max_size)
    # BOX (area averaging): no aliasing when shrinking, and faster than Pillow's bicubic default.
    preview = Image.fromarray(np.ascontiguousarray(arr)).resize(size, Image.Resampling.BOX)
    buf = io.BytesIO()
    preview.save(buf, format="WEBP", quality=80, method=0)
    return buf.getvalue()
