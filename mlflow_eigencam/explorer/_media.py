"""The explorer's overlay routes: a row's raw input, its maps and its boxes, served apart so
that the page composites them (``static/overlay.js``; docs/explorer.md, "Overlays").

* ``GET /api/overlay?run=A&mode=M&ds_id=D&epoch=E&index=I``: the row's ``overlay`` cell
  (``_layout.TABLE_OVERLAY_COLUMN``: layers and their ``[k, h, w]``, extent, boxes) as JSON;
  404 for a row logged without one (an older run: the page shows the card).
* ``GET /api/input?...same``: the sample's raw input PNG (logged once per run).
* ``GET /api/maps?...same&layer=L``: the sample's ``(k * h, w)`` uint8 grayscale maps PNG,
  cut from the epoch's maps PNG (component ``c``: rows ``c * h`` on).

Each resolves the run through :meth:`Explorer._readable_run` (the same check as the card
images: a run the request's user may not read is "no run"), and builds every artifact path
from the layout, the row and integers: nothing in a URL reaches a path.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from .. import _layout

if TYPE_CHECKING:
    from ._server import Explorer

__all__ = ["routes"]

_PNG = "image/png"


def routes(ex: "Explorer") -> Dict[str, Callable[[Dict[str, str]], Any]]:
    """The overlay routes of ``ex``, for its route table."""
    return {"/api/overlay": lambda q: _overlay(ex, q), "/api/input": lambda q: _input(ex, q),
            "/api/maps": lambda q: _maps(ex, q)}


def _cell(ex: "Explorer", q: Dict[str, str]) -> Tuple[str, str, Optional[str], dict, dict]:
    """(run id, mode, ds_id, row, overlay cell) of the request; HTTP 404 without a cell."""
    from ._server import HTTPError, _int, _mode_ds

    rid = ex._readable_run(q.get("run", "")).info.run_id
    mode, ds_id = _mode_ds(q)
    row = ex._row(rid, mode, ds_id, _int(q, "epoch"), _int(q, "index"))
    cell = row.get(_layout.TABLE_OVERLAY_COLUMN)
    if not isinstance(cell, dict) or not isinstance(cell.get("layers"), dict):
        raise HTTPError(404, f"sample {row.get('sample_index')} at epoch {row.get('epoch')} of "
                             f"run {rid} was logged without overlays (its card is shown)")
    return rid, mode, ds_id, row, cell


def _answer(ctype: str, data: bytes):
    from ._server import _IMMUTABLE, _etag

    # A logged row and its files never change (the first row of a step stands).
    return 200, [("Content-Type", ctype), ("Cache-Control", _IMMUTABLE), ("ETag", _etag(data))], data


def _read(ex: "Explorer", key: Tuple[Any, ...], make: Callable[[], Optional[bytes]]) -> Optional[bytes]:
    """``make()``'s bytes, kept in the explorer's image cache; one read per key at a time."""
    data = ex._images.get(key)
    if data is None:
        data = ex._single_flight(key, make)
        if data is not None:
            ex._images.put(key, data)
    return data


def _overlay(ex: "Explorer", q: Dict[str, str]):
    from ._server import _dumps

    _, _, _, row, cell = _cell(ex, q)
    body = dict(cell, sample_id=str(row["sample_id"]))
    return _answer("application/json; charset=utf-8", _dumps(body))


def _input(ex: "Explorer", q: Dict[str, str]):
    from ._server import HTTPError

    rid, mode, ds_id, row, _ = _cell(ex, q)
    path = _layout.input_path(mode, ds_id, str(row["sample_id"]))
    data = _read(ex, ("input", rid, path), lambda: ex.reader.read_or_none(rid, path))
    if data is None:
        raise HTTPError(404, f"run {rid} has no input of sample {row['sample_id']} ({path})")
    return _answer(_PNG, data)


def _maps(ex: "Explorer", q: Dict[str, str]):
    from ._server import HTTPError

    rid, mode, ds_id, row, cell = _cell(ex, q)
    layer = q.get("layer", "")
    shape = cell["layers"].get(layer)
    if layer not in cell["layers"]:
        raise HTTPError(404, f"run {rid} logged no layer {layer!r} here; it has "
                             f"{sorted(cell['layers'])}")
    epoch, at = int(row["epoch"]), int(cell.get("at", -1))
    path = _layout.overlay_maps_path(mode, ds_id, epoch, layer)
    whole = _read(ex, ("maps", rid, path), lambda: ex.reader.read_or_none(rid, path))
    data = None if whole is None else _cut(whole, at, [int(v) for v in shape])
    if data is None:
        raise HTTPError(404, f"run {rid} has no maps of sample {row.get('sample_index')} at "
                             f"epoch {epoch} ({path})")
    return _answer(_PNG, data)


def _cut(png: bytes, at: int, shape: List[int]) -> Optional[bytes]:
    """One sample's ``(k * h, w)`` rows of an epoch's maps PNG, as a PNG (None when the file
    does not hold them: not the logger's)."""
    import numpy as np
    from PIL import Image

    from ..render import encode_png

    k, h, w = shape
    with Image.open(io.BytesIO(png)) as im:
        if im.mode != "L":
            return None
        pixels = np.asarray(im)
    rows = pixels[at * k * h:(at + 1) * k * h]
    if at < 0 or k < 1 or rows.shape != (k * h, w):
        return None
    return encode_png(np.ascontiguousarray(rows))
