"""Image normalisation: any image a user's data loader gives -> ``(H, W, 3)`` uint8 RGB.

Numpy only (no OpenCV, no Pillow): the sample buffer converts every kept image with it, and
importing the buffer must stay cheap.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["to_rgb_uint8"]

_LAYOUTS = ("HWC", "CHW")
_CHANNELS = (1, 3, 4)


def to_rgb_uint8(image: np.ndarray, layout: Optional[str] = None) -> np.ndarray:
    """Convert one image to ``(H, W, 3)`` uint8 RGB.

    Args:
        image: ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` with C in 1 (grey, repeated to
            RGB), 3 (RGB) or 4 (RGBA, alpha dropped). uint8 is kept; bool maps to 0/255;
            other integers within [0, 255] are cast, outside it min-max normalised; floats
            within [0, 1] are scaled by 255, any other float range is min-max normalised
            (a flat out-of-range image becomes black). NaN and inf count as 0.
        layout: ``"HWC"``, ``"CHW"`` or ``None`` to detect: a 3-D array whose last
            dimension is 1, 3 or 4 is HWC, one whose first dimension is, CHW.

    Returns:
        ``(H, W, 3)`` uint8, C-contiguous, never sharing memory with ``image``.

    Raises:
        ValueError: An unknown layout, a shape that is not an image, or a shape that
            fits both layouts (e.g. ``(3, 4, 3)``) with ``layout=None``.
        TypeError: A dtype that is not boolean, integer or floating.
    """
    arr = np.asarray(image)
    if layout is not None:
        if not isinstance(layout, str) or layout.upper() not in _LAYOUTS:
            raise ValueError(f"layout must be 'HWC', 'CHW' or None, got {layout!r}")
        layout = layout.upper()

    if arr.ndim == 2:
        arr = arr[:, :, None]
    elif arr.ndim == 3:
        if layout is None:
            hwc, chw = arr.shape[2] in _CHANNELS, arr.shape[0] in _CHANNELS
            if hwc and chw:
                raise ValueError(
                    f"image shape {arr.shape} fits both HWC and CHW; pass layout='HWC' or layout='CHW'"
                )
            if not (hwc or chw):
                raise ValueError(
                    f"image shape {arr.shape} has no channel axis of size 1, 3 or 4 first or last"
                )
            layout = "HWC" if hwc else "CHW"
        if layout == "CHW":
            arr = np.moveaxis(arr, 0, -1)
        if arr.shape[2] not in _CHANNELS:
            raise ValueError(
                f"image of shape {np.asarray(image).shape} as {layout} has {arr.shape[2]} channels; "
                "expected 1, 3 or 4"
            )
    else:
        raise ValueError(f"image must be 2-D (HW) or 3-D (HWC / CHW), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image has an empty side: shape {np.asarray(image).shape}")

    if arr.shape[2] == 4:
        arr = arr[:, :, :3]  # alpha is dropped, not composited: the colour is what the model saw
    arr = _to_uint8(arr)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.array(arr, dtype=np.uint8, order="C", copy=True)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Any boolean / integer / float array -> uint8 of the same shape (see ``to_rgb_uint8``)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(arr.dtype, np.integer):
        ilo, ihi = int(arr.min()), int(arr.max())
        if ilo >= 0 and ihi <= 255:
            return arr.astype(np.uint8)
        return _minmax_uint8(arr.astype(np.float64))
    if np.issubdtype(arr.dtype, np.floating):
        data = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(data.min()), float(data.max())
        if lo >= 0.0 and hi <= 1.0:
            return np.rint(data * 255.0).astype(np.uint8)
        return _minmax_uint8(data)
    raise TypeError(f"image dtype must be boolean, integer or floating, got {arr.dtype}")


def _minmax_uint8(data: np.ndarray) -> np.ndarray:
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        return np.zeros(data.shape, np.uint8)
    return np.rint((data - lo) * (255.0 / (hi - lo))).astype(np.uint8)

