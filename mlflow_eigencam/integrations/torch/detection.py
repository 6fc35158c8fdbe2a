"""torchvision detectors: their outputs (boxes) and the padded canvas their backbone sees.

A detector's ``transform`` (``GeneralizedRCNNTransform``) resizes each image and pads the
batch to one canvas; the backbone's feature map covers that canvas, padding included. The
monitor hooks the transform to learn each image's size on the canvas (:class:`Canvas`) and
crops the map to the cells over the image (:func:`crop_to_images`), so the heat map is drawn
over the image, not over its padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from .layers import fits_geometry

__all__ = ["Canvas", "canvas_of", "crop_to_images", "detections", "transform_of"]


def detections(x: Any) -> Optional[list]:
    """``x`` when it is a detector's output or targets (a list of dicts with ``"boxes"``)."""
    if isinstance(x, (list, tuple)) and x and all(
            isinstance(item, dict) and "boxes" in item for item in x):
        return list(x)
    return None


def transform_of(model: nn.Module) -> Optional[nn.Module]:
    """A torchvision detector's ``transform`` (``GeneralizedRCNNTransform``), else None: the
    module that resizes each image and pads the batch before the backbone sees it."""
    transform = getattr(model, "transform", None)
    return transform if isinstance(transform, nn.Module) else None


@dataclass
class Canvas:
    """The padded batch a detector's backbone saw: ``(height, width)`` pixels, and each
    image's ``(h, w)`` after the resize, in its top-left corner (the rest is zero padding)."""

    height: int
    width: int
    image_sizes: List[Tuple[int, int]]

    def cells(self, grid_hw: Tuple[int, int], index: int) -> Optional[Tuple[int, int]]:
        """The ``(rows, cols)`` of a ``grid_hw`` feature map over this canvas that cover image
        ``index``: ``ceil(h * rows_total / height)`` (and the same for the width), so a
        row or column only partly over the image is kept. None when the map is not a map of
        this canvas (another geometry) or the index has no size."""
        if index >= len(self.image_sizes):
            return None
        gh, gw = int(grid_hw[0]), int(grid_hw[1])
        if not fits_geometry(gh, gw, self.height, self.width):
            return None
        h, w = self.image_sizes[index]
        rows = min(gh, max(1, -(-h * gh // self.height)))  # integer ceil
        cols = min(gw, max(1, -(-w * gw // self.width)))
        return rows, cols


def canvas_of(output: Any) -> Optional[Canvas]:
    """What a detector's transform returned, ``(ImageList, targets)``, as a :class:`Canvas`;
    None for any other output (the model is then treated like a classifier)."""
    first = output[0] if isinstance(output, (tuple, list)) and output else output
    sizes, tensors = getattr(first, "image_sizes", None), getattr(first, "tensors", None)
    if not isinstance(tensors, torch.Tensor) or tensors.ndim != 4 or not sizes:
        return None
    try:
        hw = [(int(h), int(w)) for h, w in sizes]
    except (TypeError, ValueError):
        return None
    return Canvas(height=int(tensors.shape[-2]), width=int(tensors.shape[-1]), image_sizes=hw)


def crop_to_images(
    grid: torch.Tensor, canvas: Optional[Canvas],
) -> Tuple[torch.Tensor, Optional[Tuple[float, float]]]:
    """A ``(B, C, h, w)`` map of the padded canvas cropped, top left, to the cells that
    cover the images (:meth:`Canvas.cells`), and the fractions ``(fy, fx)`` of the kept
    cells that the images fill (the last row / column may be partly padding: the renderer
    draws the map over ``1 / fy`` of the image's height and shows the image's part). The
    whole map and None when there is no canvas.

    Same-size images (what ``update()`` takes) share one crop. Should the transform give
    the samples different sizes (training-mode multi-scale ``min_size``), the largest crop is
    used for all: the logger computes one epoch's maps from samples of one shape.
    """
    if canvas is None:
        return grid, None
    gh, gw = int(grid.shape[2]), int(grid.shape[3])
    crops = [canvas.cells((gh, gw), i) for i in range(int(grid.shape[0]))]
    kept = [c for c in crops if c is not None]
    if len(kept) != len(crops):
        return grid, None  # not a map of this canvas: left as it is
    rows, cols = max(c[0] for c in kept), max(c[1] for c in kept)
    n = len(kept)
    height = max(h for h, _ in canvas.image_sizes[:n])
    width = max(w for _, w in canvas.image_sizes[:n])
    extent = (min(1.0, height * gh / (rows * canvas.height)),
              min(1.0, width * gw / (cols * canvas.width)))
    return grid[:, :, :rows, :cols], (None if extent == (1.0, 1.0) else extent)
