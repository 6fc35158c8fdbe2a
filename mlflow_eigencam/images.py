"""Image normalisation: any image a user's data loader gives -> ``(H, W, 3)`` uint8 RGB; and
the one bilinear resize of a map to an image (what the renderer draws and the signals score).

Numpy only (no OpenCV, no Pillow): the sample buffer converts every kept image with it, and
importing the buffer must stay cheap. The package has no OpenCV dependency at all: Ultralytics
requires ``opencv-python`` and other stacks ``opencv-python-headless``, two wheels that
install the same ``cv2`` files over each other (docs/internals.md, "No OpenCV").
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import numpy as np

__all__ = ["gaussian_blur", "resize_bilinear", "to_rgb_uint8", "upsample"]

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



def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` float32 bilinear weights with half-pixel centres: output pixel ``i``
    samples the input at ``(i + 0.5) * n_in / n_out - 0.5``, clamped to the edge pixels
    (OpenCV's ``INTER_LINEAR`` rule, so maps line up with the pixels the way they always did)."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).astype(np.float32)
    w = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(w, (rows, lo), 1.0 - frac)
    np.add.at(w, (rows, hi), frac)
    return w


def resize_bilinear(m: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of one map: ``(h, w)`` float -> ``(height, width)`` float32.

    Two small matrix products (``Wy @ m @ Wx.T``): a 7 x 7 map to 224 x 224 in ~0.1 ms.
    Equal to ``cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR)`` within
    float32 rounding (tests/yolo/test_no_opencv.py checks it where OpenCV is installed).
    """
    a = np.asarray(m, dtype=np.float32)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"resize_bilinear takes a non-empty (h, w) map, got shape {a.shape}")
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"height and width must be >= 1, got {height!r} x {width!r}")
    h, w = a.shape
    if (h, w) == (height, width):
        return a.copy()
    return _linear_weights(h, int(height)) @ a @ _linear_weights(w, int(width)).T


def upsample(cam_map: np.ndarray, height: int, width: int,
             extent: Optional[Tuple[float, float]] = None) -> np.ndarray:
    """A map's positive part at image resolution: the geometry the renderer draws and the
    signals score. ReLU, then :func:`resize_bilinear` to (height, width); with ``extent``
    ``(fy, fx)`` (a detector's padded canvas: the image covers only these fractions of the
    map, from the top left) resized to ``height / fy`` x ``width / fx`` and cropped to the
    image's top-left part.

    Args:
        cam_map: ``(h, w)`` float map, any sign and scale (NaN and inf count as 0).
        height, width: The image's size in pixels.
        extent: Fractions of the map the image covers, or None for all of it.

    Returns:
        ``(height, width)`` float32 >= 0, not normalised.
    """
    m = np.asarray(cam_map)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"cam_map must be a non-empty 2-D (h, w) array, got shape {m.shape}")
    if not (np.issubdtype(m.dtype, np.floating) or np.issubdtype(m.dtype, np.integer) or m.dtype == np.bool_):
        raise TypeError(f"cam_map must be numeric, got dtype {m.dtype}")
    m = np.maximum(np.nan_to_num(m.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0), 0.0)
    if extent is not None:
        fy, fx = (min(1.0, max(float(f), 1e-3)) for f in extent)
        full_h, full_w = max(height, int(round(height / fy))), max(width, int(round(width / fx)))
        return np.ascontiguousarray(resize_bilinear(m, full_h, full_w)[:height, :width])
    return resize_bilinear(m, int(height), int(width))


@functools.lru_cache(maxsize=16)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """``(n, n)`` float32: a 1-D Gaussian (truncated at 4 sigma, normalised) with the border
    mirrored ("dcba|abcd", OpenCV's ``BORDER_REFLECT``) folded into the matrix."""
    radius = max(1, int(4.0 * sigma + 0.5))
    k = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (k / sigma) ** 2)
    weights /= weights.sum()
    j = (np.arange(n)[:, None] + k[None, :]) % (2 * n)  # mirrored indices, period 2n
    j = np.where(j >= n, 2 * n - 1 - j, j)
    out = np.zeros((n, n), np.float64)
    np.add.at(out, (np.repeat(np.arange(n), k.size), j.ravel()), np.tile(weights, n))
    return out.astype(np.float32)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over the last two axes: ``(..., H, W)`` -> float32 of the same shape.

    As two large matrix products (one per axis, over all planes at once), so a large sigma
    costs no more than a small one: 16 x 3 x 224 x 224 at sigma 28 takes ~0.06-0.08 s here,
    less than OpenCV's ``GaussianBlur`` (0.13-0.19 s, same run), whose result it equals within
    float32 rounding.
    """
    a = np.asarray(x, dtype=np.float32)
    if a.ndim < 2 or a.shape[-1] == 0 or a.shape[-2] == 0:
        raise ValueError(f"gaussian_blur takes a (..., H, W) array, got shape {a.shape}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    h, w = a.shape[-2:]
    rows = (a.reshape(-1, w) @ _blur_matrix(w, float(sigma)).T).reshape(a.shape)
    cols = np.ascontiguousarray(rows.swapaxes(-1, -2)).reshape(-1, h) @ _blur_matrix(h, float(sigma)).T
    return np.ascontiguousarray(cols.reshape(a.shape[:-2] + (w, h)).swapaxes(-1, -2))
