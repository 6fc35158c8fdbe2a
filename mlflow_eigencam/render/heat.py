"""Heat: colormaps and the overlay of one heat map on one image.

The colormaps are OpenCV's (the same names, ``cv2.COLORMAP_*`` numbers and colours), read from
``colormaps.npy`` (22 x 256 x 3 uint8 RGB, made once with ``cv2.applyColorMap``) so that the
package needs no OpenCV. Heat maps are ReLU'd, resized to the image with the package's one
bilinear resize (``images.upsample``), then min-max normalised. A flat map (all equal after the ReLU, e.g. all
zero) carries no heat: it is drawn as the colormap's zero colour everywhere (dark blue for
``"jet"``), the same colour as the cold regions of every other overlay, and never as NaN.
"""

from __future__ import annotations

import functools
import numbers
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..images import to_rgb_uint8, upsample

__all__ = ["COLORMAPS", "check_alpha", "overlay", "resolve_colormap"]

# OpenCV's colormap numbers, in order (cv2.COLORMAP_AUTUMN = 0 ... COLORMAP_DEEPGREEN = 21):
# the row of each colormap in colormaps.npy.
_NAMES = ("autumn", "bone", "jet", "winter", "rainbow", "ocean", "summer", "spring", "cool", "hsv",
          "pink", "hot", "parula", "magma", "inferno", "plasma", "viridis", "cividis", "twilight",
          "twilight_shifted", "turbo", "deepgreen")

#: Colormaps by lower-case name ("jet", "viridis", ...) -> OpenCV's cv2.COLORMAP_* number.
COLORMAPS: dict[str, int] = {name: _NAMES.index(name) for name in sorted(_NAMES)}


def resolve_colormap(name: Union[str, int]) -> int:
    """An OpenCV colormap constant from a case-insensitive name or the constant itself.

    Args:
        name: ``"jet"``, ``"VIRIDIS"``, ``"COLORMAP_TURBO"`` or ``cv2.COLORMAP_JET``.

    Raises:
        ValueError: An unknown name or constant; the message lists the valid names.
        TypeError: Neither a string nor an int.
    """
    if isinstance(name, str):
        key = name.strip().lower()
        if key.startswith("colormap_"):
            key = key[len("colormap_") :]
        if key in COLORMAPS:
            return COLORMAPS[key]
        raise ValueError(f"unknown colormap {name!r}; expected one of {', '.join(COLORMAPS)}"
                         " or a cv2.COLORMAP_* number")
    if isinstance(name, (int, np.integer)) and not isinstance(name, (bool, np.bool_)):
        if int(name) in COLORMAPS.values():
            return int(name)
        raise ValueError(
            f"unknown colormap constant {name!r}; expected one of "
            + ", ".join(f"{v} ({k})" for k, v in COLORMAPS.items())
        )
    raise TypeError(f"colormap must be a name or a cv2.COLORMAP_* number, got {name!r} ({type(name).__name__})")


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float if it is a number in [0, 1], else a TypeError / ValueError."""
    if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a number in [0, 1], got {alpha!r} ({type(alpha).__name__})")
    if not 0.0 <= float(alpha) <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    return float(alpha)


def _heat_rgb(cam_map: np.ndarray, width: int, height: int, colormap: int,
              extent: Optional[tuple[float, float]] = None) -> np.ndarray:
    """``(h, w)`` map -> ``(height, width, 3)`` uint8 RGB heat.

    ``extent``: the fractions ``(fy, fx)`` in (0, 1] of the map's height and width that the
    image covers from the top left (a detector's map whose last cells are partly padding);
    the map is resized to ``height / fy`` x ``width / fx`` and cropped to the image.
    """
    # ReLU (only evidence for the component is drawn), then the image's size; raises on a
    # map that is not a non-empty numeric (h, w) array.
    m = upsample(cam_map, height, width, extent)
    # Normalise after the resize so that the hottest visible pixel gets the top colour.
    lo, hi = float(m.min()), float(m.max())
    if hi - lo <= 1e-6 * max(abs(hi), abs(lo)):
        # Flat (all zero after the ReLU, or constant): no heat, the colormap's zero colour.
        norm = np.zeros((height, width), np.uint8)
    else:
        norm = np.rint((m - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    return _colormap_rgb(colormap)[norm]


@functools.lru_cache(maxsize=1)
def _colormap_tables() -> np.ndarray:
    tables = np.load(Path(__file__).with_name("colormaps.npy"), allow_pickle=False)
    if tables.shape != (len(_NAMES), 256, 3) or tables.dtype != np.uint8:
        raise RuntimeError(f"colormaps.npy is damaged: shape {tables.shape}, dtype {tables.dtype}")
    return tables


def _colormap_rgb(colormap: int) -> np.ndarray:
    """``(256, 3)`` uint8 RGB table of a colormap: indexing it with a uint8 map equals OpenCV's
    ``applyColorMap`` + BGR->RGB."""
    return _colormap_tables()[colormap]


def overlay(
    image: np.ndarray,
    cam_map: np.ndarray,
    *,
    colormap: Union[str, int] = "jet",
    alpha: float = 0.5,
    layout: Optional[str] = None,
    map_extent: Optional[tuple[float, float]] = None,
) -> np.ndarray:
    """Blend one heat map over one image.

    Args:
        image: Any image ``to_rgb_uint8`` accepts (HWC / CHW / HW; uint8 or float).
        cam_map: ``(h, w)`` float map, any sign and scale; ReLU'd, resized to the image
            with bilinear interpolation and min-max normalised (a flat map gives no heat,
            see the module docstring).
        colormap: A colormap name (case-insensitive, OpenCV's names) or its ``cv2.COLORMAP_*`` number.
        alpha: Weight of the heat in [0, 1]; 0 gives the image, 1 the heat alone.
        layout: Passed to ``to_rgb_uint8``.
        map_extent: ``(fy, fx)``: the image covers only these fractions of the map's
            height and width, from the top left (a detector's padded canvas); None: all.

    Returns:
        ``(H, W, 3)`` uint8 RGB, ``round((1 - alpha) * image + alpha * heat)``.
    """
    cmap = resolve_colormap(colormap)
    a = check_alpha(alpha)
    rgb = to_rgb_uint8(image, layout)
    height, width = rgb.shape[:2]
    heat = _heat_rgb(cam_map, width, height, cmap, map_extent)
    blended = (1.0 - a) * rgb.astype(np.float32) + a * heat.astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
