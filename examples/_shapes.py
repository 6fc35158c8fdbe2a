"""Synthetic "shapes" images for the examples, tests and benchmarks (numpy only).

Each image is a noisy background with one filled shape (circle, square, triangle or
cross) of a random colour drawn at a random, known position. The class is the shape, so a
tiny CNN learns it in a few epochs and EigenCAM has an obvious right answer: the box.

    images, labels, boxes = make_shapes(64, size=32, seed=0)   # (64, 3, 32, 32) float32

Nothing is downloaded; the same seed gives the same arrays on every machine.
"""

from __future__ import annotations

from typing import Tuple, Union

import numpy as np

#: Class names, indexed by label.
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "cross")


def _shape_mask(kind: str, side: int) -> np.ndarray:
    """A (side, side) bool mask of one shape filling its box."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    c = side / 2.0
    if kind == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= c * c
    if kind == "square":
        return np.ones((side, side), dtype=bool)
    if kind == "triangle":
        # Apex at the top centre, base along the bottom row.
        return np.abs(xx - c) <= yy / 2.0
    if kind == "cross":
        t = max(side / 6.0, 1.0)
        return (np.abs(xx - c) <= t) | (np.abs(yy - c) <= t)
    raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPES}")


def make_shapes(
    n: int,
    size: Union[int, Tuple[int, int]] = 32,
    *,
    n_classes: int = 3,
    seed: int = 0,
    layout: str = "NCHW",
    noise: float = 0.15,
    min_frac: float = 0.35,
    max_frac: float = 0.6,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make ``n`` seeded images of shapes on noisy backgrounds.

    Args:
        n: Number of images (>= 1).
        size: Image side, or ``(height, width)`` for non-square images.
        n_classes: How many of :data:`SHAPES` to use (1 to 4); labels are ``0..n_classes-1``.
        seed: Seed of the generator; equal seeds give equal arrays.
        layout: ``"NCHW"`` (PyTorch) or ``"NHWC"`` (Keras).
        noise: Standard deviation of the Gaussian background noise.
        min_frac: Smallest shape side as a fraction of the shorter image side.
        max_frac: Largest shape side as a fraction of the shorter image side.

    Returns:
        ``(images, labels, boxes)``: images float32 ``(n, 3, H, W)`` or ``(n, H, W, 3)`` in
        [0, 1]; labels int64 ``(n,)``; boxes int64 ``(n, 4)`` as ``(x0, y0, x1, y1)`` pixel
        bounds of the shape, ``x1``/``y1`` exclusive.

    Raises:
        ValueError: On a bad ``n``, ``size``, ``n_classes``, ``layout`` or fraction.
    """
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if min(height, width) < 8:
        raise ValueError(f"size must be at least 8 pixels per side, got {size!r}")
    if not 1 <= n_classes <= len(SHAPES):
        raise ValueError(f"n_classes must be in 1..{len(SHAPES)}, got {n_classes!r}")
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    if not 0.0 < min_frac <= max_frac <= 1.0:
        raise ValueError(f"need 0 < min_frac <= max_frac <= 1, got {min_frac!r}, {max_frac!r}")

    rng = np.random.default_rng(seed)
    short = min(height, width)
    images = np.empty((n, height, width, 3), dtype=np.float32)
    labels = rng.integers(0, n_classes, size=n).astype(np.int64)
    boxes = np.empty((n, 4), dtype=np.int64)
    for i in range(n):
        background = rng.uniform(0.1, 0.4, size=3).astype(np.float32)
        img = background + rng.normal(0.0, noise, size=(height, width, 3)).astype(np.float32)
        side = int(rng.integers(max(int(short * min_frac), 3), max(int(short * max_frac), 3) + 1))
        y0 = int(rng.integers(0, height - side + 1))
        x0 = int(rng.integers(0, width - side + 1))
        mask = _shape_mask(SHAPES[labels[i]], side)
        # Bright colours so the shape always stands out from the darker background.
        colour = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
        patch = img[y0 : y0 + side, x0 : x0 + side]
        patch[mask] = colour
        images[i] = np.clip(img, 0.0, 1.0)
        boxes[i] = (x0, y0, x0 + side, y0 + side)
    if layout == "NCHW":
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    return images, labels, boxes
