"""Rendering: heat overlays, per-sample cards, detection boxes, per-epoch grids, PNG bytes.

Numpy, OpenCV and Pillow only; nothing here knows about MLflow or any training framework.
Every function is deterministic: equal inputs give equal pixels and equal PNG bytes.

Modules: :mod:`.heat` (colormaps, overlay), :mod:`.text` (fonts, fitting text),
:mod:`.card` (the per-sample card and its geometry), :mod:`.boxes` (detection boxes),
:mod:`.masks` (segmentation masks),
:mod:`.grid` (the epoch grid), :mod:`.png` (the PNG encoder and MLflow's WebP preview).
Image normalisation (``to_rgb_uint8``) lives in :mod:`mlflow_eigencam.images` (numpy only)
and is re-exported here.
"""

from __future__ import annotations

from ..images import to_rgb_uint8
from .boxes import MAX_DRAWN_BOXES, TRUTH_BOX_COLOUR, box_colour, draw_boxes, render_detection_card
from .card import card_geometry, card_layout, panel_size, render_card
from .grid import GRID_COLUMNS, grid_bands, render_grid
from .heat import COLORMAPS, overlay, resolve_colormap
from .masks import MASK_FILL_ALPHA, TRUTH_MASK_COLOUR, draw_mask, render_segmentation_card
from .png import PREVIEW_SIZE, PNGBand, encode_png, encode_webp_preview

__all__ = [
    "COLORMAPS",
    "GRID_COLUMNS",
    "MASK_FILL_ALPHA",
    "MAX_DRAWN_BOXES",
    "PREVIEW_SIZE",
    "TRUTH_BOX_COLOUR",
    "TRUTH_MASK_COLOUR",
    "PNGBand",
    "box_colour",
    "card_geometry",
    "card_layout",
    "draw_boxes",
    "draw_mask",
    "encode_png",
    "encode_webp_preview",
    "grid_bands",
    "overlay",
    "panel_size",
    "render_card",
    "render_detection_card",
    "render_grid",
    "render_segmentation_card",
    "resolve_colormap",
    "to_rgb_uint8",
]
