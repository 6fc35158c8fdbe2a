"""Items and their records: what the sink hands from the training thread to the sender.

An :class:`Item` is one epoch's bundle (or a set of run tags); :func:`item_to_record` turns it
into the header and raw blobs of one spool record (see :mod:`._spool`) and
:func:`item_from_record` reads one back, checking every field, since a spool on disk is
untrusted input.

A bundle's epoch grid travels as a recipe (:attr:`Item.grids`: which cards, which header),
not as pixels: the cards are in the record already, and :func:`compose_grids` draws the grid
from them on the sender, off the training thread (it was ~50 ms and twice the bytes per
epoch at 224x224 when the training thread drew it).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import _layout, _spool
from ._spool import SpoolError

_FILES_DIR = "files"
RECORD_FORMAT = 1
RUN_ID = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


@dataclass
class Item:
    """One unit of work for MLflow.

    kind ``tags``: ``tags`` set on the run. kind ``bundle``: everything one (mode, ds_id)
    logs at one epoch, sent together: ``files`` ({artifact path: payload}) uploaded in one
    ``log_artifacts`` call, then one ``log_batch`` with ``metrics``
    ([[key, value, step, timestamp_ms], ...]) and the tags this process has not set yet.
    A file listed in ``tables`` is a table (MLflow's ``orient="split"`` JSON) whose rows are
    merged into the run's table of that path (dedup by epoch and sample index), not a
    replacement of it. Every part is idempotent (fixed file names, merged tables, tags,
    identical metrics), so an item retried after a partial send duplicates nothing.
    ``run_id`` / ``tracking_uri`` None: the sink's run (created by the sender).

    ``grids``: {artifact path: {"epoch", "mode", "ds_id", "cards": [artifact paths of card
    PNGs in ``files``]}}: grids drawn on the sender from those cards (:func:`compose_grids`).
    ``once``: [metric key, step]: the bundle is one logged epoch; when the run already has
    that metric at that step, the sender drops the bundle (the first logged epoch stands).
    """

    kind: str
    run_id: Optional[str]
    tracking_uri: Optional[str]
    files: Optional[Dict[str, Any]] = None  # path -> bytes, str, Encoded or a local Path
    metrics: Optional[List[list]] = None
    tables: Optional[List[str]] = None
    tags: Optional[Dict[str, str]] = None
    grids: Optional[Dict[str, dict]] = None
    once: Optional[list] = None


class Encoded:
    """An image encoded on first use (by the sender, or by the training thread under load).

    ``fmt`` ``png``: ``source`` is an (H, W, 3) uint8 array or a list of
    :class:`render.PNGBand` (a strip's band is compressed once for its own PNG and the grid).
    ``webp-preview``: ``source`` is an (H, W, 3) uint8 array, see
    :func:`render.encode_webp_preview`. One object may back several files: it is encoded once.
    """

    __slots__ = ("_data", "_lock", "fmt", "source")

    def __init__(self, source: Any, fmt: str = "png") -> None:
        if fmt not in ("png", "webp-preview"):
            raise ValueError(f"fmt must be 'png' or 'webp-preview', got {fmt!r}")
        self.source = source
        self.fmt = fmt
        self._data: Optional[bytes] = None
        self._lock = threading.Lock()

    def data(self) -> bytes:
        with self._lock:
            if self._data is None:
                from .render import encode_png, encode_webp_preview

                encode = encode_png if self.fmt == "png" else encode_webp_preview
                self._data = encode(self.source)
            return self._data

    @property
    def ready(self) -> bool:
        return self._data is not None

    def encode_unless_busy(self) -> None:
        """Encode now unless another thread is doing it (never wait on a starved sender)."""
        if self._data is None and self._lock.acquire(blocking=False):
            try:
                if self._data is None:
                    from .render import encode_png, encode_webp_preview

                    encode = encode_png if self.fmt == "png" else encode_webp_preview
                    self._data = encode(self.source)
            finally:
                self._lock.release()


class ForeignRecord(SpoolError):
    """A well-formed record that holds something the logger never writes (an artifact path
    outside the package's folders, MLflow's own tags, a metric of another name): refused,
    set aside in ``failed/`` and reported, never sent."""


def foreign_parts(item: Item) -> List[str]:
    """What of ``item`` the logger would never write, as short descriptions (empty: none).

    A record may hold only the package's artifact paths, metric names and tags
    (:func:`_layout.is_own_artifact_path`, :func:`_layout.is_own_metric_key`,
    :func:`_layout.is_own_tag_key`) and a user's extra tags outside MLflow's ``mlflow.``
    namespace (:func:`_layout.user_tag_problem`)."""
    out = [f"artifact {p!r}" for p in [*(item.files or {}), *(item.grids or {})]
           if not _layout.is_own_artifact_path(p)]
    out += [f"metric {m[0]!r}" for m in item.metrics or []
            if not _layout.is_own_metric_key(m[0])]
    if item.once is not None and not _layout.is_own_metric_key(item.once[0]):
        out.append(f"metric {item.once[0]!r}")
    for key, value in (item.tags or {}).items():
        if key == _layout.MLFLOW_LOGGED_IMAGES and value != "True":
            out.append(f"tag {key!r}={value[:40]!r}")
        elif not _layout.is_own_tag_key(key) and _layout.user_tag_problem(key) is not None:
            out.append(f"tag {key!r}")
    return out


def _safe_relative(path: str) -> Path:
    rel = Path(path)
    if (not isinstance(path, str) or rel.is_absolute() or ".." in rel.parts or not rel.parts
            or "\\" in path or "\x00" in path):
        raise ValueError(f"artifact path must be relative without '..', got {path!r}")
    return rel


# -- records: an item as a header and raw blobs ------------------------------------------
def item_to_record(item: Item) -> Tuple[dict, list]:
    """(header, blobs) of ``item`` for :func:`_spool.write_record`.

    Images not encoded yet are stored as their raw uint8 pixel arrays (no copy, no
    compression: the cheapest thing the training thread can write); encoded ones as bytes.
    A payload shared by several paths, and a band shared by a strip and the grid, is stored
    once.
    """
    from .render import PNGBand

    if item.kind not in ("bundle", "tags"):
        raise ValueError(f"unknown item kind {item.kind!r}")
    blobs: list = []
    keep: list = []  # objects whose id() is used as a key stay alive until we are done
    blob_of: Dict[int, int] = {}
    arrays: List[list] = []
    array_of: Dict[int, int] = {}

    def blob(obj: Any, buf: Any) -> int:
        if id(obj) not in blob_of:
            keep.append(obj)
            blob_of[id(obj)] = len(blobs)
            blobs.append(buf)
        return blob_of[id(obj)]

    def array(a: Any) -> int:
        pixels = a.pixels if isinstance(a, PNGBand) else a
        if id(pixels) not in array_of:
            keep.append(pixels)
            arr = np.ascontiguousarray(pixels)
            if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
                raise ValueError(f"image pixels must be 2-D or 3-D uint8, got {arr.dtype} "
                                 f"{arr.shape}")
            array_of[id(pixels)] = len(arrays)
            arrays.append([blob(arr, arr), list(arr.shape)])
        return array_of[id(pixels)]

    files: Dict[str, dict] = {}
    for path, payload in list((item.files or {}).items()):  # a snapshot: the sender may add a grid
        _safe_relative(path)
        if isinstance(payload, Encoded):
            if payload.ready:
                files[path] = {"bytes": blob(payload, payload.data())}
            elif payload.fmt == "png":
                src = payload.source
                bands = [src] if isinstance(src, np.ndarray) else list(src)
                files[path] = {"png": [array(b) for b in bands]}
            else:
                files[path] = {"webp": array(payload.source)}
        elif isinstance(payload, (bytes, bytearray, memoryview)):
            files[path] = {"bytes": blob(payload, payload)}
        elif isinstance(payload, str):
            files[path] = {"bytes": blob(payload, payload.encode("utf-8"))}
        elif isinstance(payload, Path):
            files[path] = {"bytes": blob(payload, payload.read_bytes())}
        else:
            raise TypeError(f"a file payload must be bytes, str, Encoded or Path, got "
                            f"{type(payload)!r}")
    header = {"format": RECORD_FORMAT, "kind": item.kind, "run_id": item.run_id,
              "tracking_uri": item.tracking_uri, "metrics": item.metrics,
              "tables": item.tables, "tags": item.tags, "files": files, "arrays": arrays,
              "grids": item.grids, "once": item.once}
    return header, blobs


def item_from_record(path: Path) -> Item:
    """Load a record written by :meth:`MlflowSink.submit`, checking every field.

    Raises:
        ForeignRecord: a well-formed record holding what the logger never writes.
        SpoolError: the record is damaged, a symlink, or malformed.
    """
    from .render import PNGBand

    header, _data, blobs = _spool.read_record(path)

    def bad(what: str) -> SpoolError:
        return SpoolError(f"{path.name}: {what}")

    if header.get("format") != RECORD_FORMAT or header.get("kind") not in ("bundle", "tags"):
        raise bad(f"unknown record format/kind {header.get('format')!r}/{header.get('kind')!r}")
    arrays = []
    for entry in header.get("arrays") or []:
        if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], int)
                or not 0 <= entry[0] < len(blobs) or not isinstance(entry[1], list)):
            raise bad(f"bad array entry {entry!r}")
        shape = entry[1]
        if (len(shape) not in (2, 3) or not all(isinstance(s, int) and s > 0 for s in shape)
                or (len(shape) == 3 and shape[2] != 3)
                or int(np.prod(shape)) != len(blobs[entry[0]])):
            raise bad(f"bad array shape {shape!r}")
        arrays.append(np.frombuffer(blobs[entry[0]], np.uint8).reshape(shape))

    def index(i: Any, n: int) -> int:
        if not isinstance(i, int) or not 0 <= i < n:
            raise bad(f"bad index {i!r}")
        return i

    bands: Dict[int, Any] = {}
    shared: Dict[str, Any] = {}
    files: Dict[str, Any] = {}
    raw_files = header.get("files") or {}
    if not isinstance(raw_files, dict):
        raise bad("bad file list")
    for p, spec in raw_files.items():
        try:
            _safe_relative(p)
        except ValueError as exc:
            raise bad(str(exc)) from exc
        if not isinstance(spec, dict) or len(spec) != 1:
            raise bad(f"bad file entry for {p!r}")
        key = json.dumps(spec, sort_keys=True)
        if key not in shared:
            (fmt, value), = spec.items()
            if fmt == "bytes":
                shared[key] = bytes(blobs[index(value, len(blobs))])
            elif fmt == "png" and isinstance(value, list) and value:
                shared[key] = Encoded([bands.setdefault(index(i, len(arrays)),
                                                        PNGBand(arrays[i])) for i in value])
            elif fmt == "webp":
                shared[key] = Encoded(arrays[index(value, len(arrays))], "webp-preview")
            else:
                raise bad(f"bad file entry for {p!r}")
        files[p] = shared[key]
    metrics = header.get("metrics") or []
    if not isinstance(metrics, list) or not all(
            isinstance(m, list) and len(m) == 4 and isinstance(m[0], str)
            and isinstance(m[1], (int, float)) and isinstance(m[2], int)
            and isinstance(m[3], int) for m in metrics):
        raise bad("bad metrics")
    tags = header.get("tags") or {}
    if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in tags.items()):
        raise bad("bad tags")
    tables = header.get("tables") or []
    if not isinstance(tables, list) or not all(t in files for t in tables):
        raise bad("bad table list")
    run_id = header.get("run_id")
    if run_id is not None and not (isinstance(run_id, str) and RUN_ID.match(run_id)):
        raise bad(f"bad run id {run_id!r}")
    grids = header.get("grids") or {}
    if not isinstance(grids, dict) or not all(_good_grid(p, g, files) for p, g in grids.items()):
        raise bad("bad grid list")
    once = header.get("once")
    if once is not None and not (isinstance(once, list) and len(once) == 2
                                 and isinstance(once[0], str) and isinstance(once[1], int)):
        raise bad(f"bad once entry {once!r}")
    uri = header.get("tracking_uri")
    item = Item(header["kind"], run_id, uri if isinstance(uri, str) else None,
                files=files or None, metrics=metrics or None, tables=tables or None,
                tags=tags or None, grids=grids or None, once=once)
    foreign = foreign_parts(item)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5
                                          else "")
        raise ForeignRecord(f"{path.name}: refused: holds what mlflow_eigencam never writes: "
                            f"{shown}")
    return item


def _good_grid(path: Any, grid: Any, files: Dict[str, Any]) -> bool:
    try:
        _safe_relative(path)
    except ValueError:
        return False
    return (isinstance(grid, dict) and set(grid) == {"epoch", "mode", "ds_id", "cards"}
            and isinstance(grid["epoch"], int) and isinstance(grid["mode"], str)
            and (grid["ds_id"] is None or isinstance(grid["ds_id"], str))
            and isinstance(grid["cards"], list) and len(grid["cards"]) > 0
            and all(isinstance(c, str) and c in files for c in grid["cards"]))


def compose_grids(item: Item) -> None:
    """Draw each grid of ``item.grids`` from its cards (in ``item.files``) into
    ``item.files``, then clear ``item.grids``. Sender side: the training thread never
    draws a grid. Cards come as pixels (a live item, or a record written before they were
    encoded) or as PNG bytes (encoded before they were spooled), decoded losslessly here."""
    from .render import grid_bands

    for path, grid in (item.grids or {}).items():
        files = item.files if item.files is not None else {}
        cards = [_card_pixels(files[c]) for c in grid["cards"]]
        files[path] = Encoded(grid_bands(cards, epoch=grid["epoch"], mode=grid["mode"],
                                         ds_id=grid["ds_id"]))
        item.files = files
    item.grids = None


def _card_pixels(payload: Any) -> np.ndarray:
    """(H, W, 3) uint8 pixels of one card payload: an Encoded PNG or PNG bytes."""
    from .render import PNGBand

    if isinstance(payload, Encoded) and payload.fmt == "png":
        src = payload.source
        bands = [src] if isinstance(src, (np.ndarray, PNGBand)) else list(src)
        parts = [b.pixels if isinstance(b, PNGBand) else np.asarray(b) for b in bands]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    if isinstance(payload, (bytes, bytearray, memoryview)):
        from PIL import Image

        with Image.open(io.BytesIO(bytes(payload))) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    raise ValueError(f"a grid card must be a PNG, got {type(payload)!r}")


# -- staging: a payload as a file ------------------------------------------------------
def write_payload(target: Path, payload: Any, written: Dict[int, Path]) -> None:
    """Write one payload of a bundle to ``target`` in the staging folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # One payload under two names (an image in the epoch folder and in the image series,
    # encoded or a streamed file): write it once, link the second name.
    first = written.get(id(payload))
    if first is not None:
        try:
            os.link(first, target)
            return
        except OSError:  # no hard links on this filesystem
            pass
    written[id(payload)] = target
    if isinstance(payload, Path):
        shutil.copyfile(payload, target)
    elif isinstance(payload, Encoded):
        target.write_bytes(payload.data())
    elif isinstance(payload, (bytes, bytearray, memoryview)):
        target.write_bytes(bytes(payload))
    elif isinstance(payload, str):
        target.write_text(payload, encoding="utf-8")
    else:
        raise TypeError(f"a file payload must be bytes, str, Encoded or Path, got "
                        f"{type(payload)!r}")
