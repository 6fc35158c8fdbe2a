"""The samples table: its rows, its JSON, merging parts into it and reading it back.

One table per (mode, ds_id), in MLflow's own table format (pandas ``orient="split"`` JSON:
``{"columns": [...], "data": [[...], ...]}``) so ``mlflow.load_table`` reads it.

**Where the rows live: append-only parts, one per bundle.** Every epoch a logger logs writes
its rows as a part of its own, ``table/epoch_{e:04d}-{ms:013d}-{writer}.json``
(``_layout.table_part_path``: the epoch, when it ended, and a token per logger), which no
other writer ever rewrites. So any number of processes may write one run's table at once (a
resumed training beside ``send-spool`` of the dead one, two trainings on one run) and no row
is lost. ``samples.json`` is a convenience view for MLflow's UI and ``mlflow.load_table``:
the sender merges each bundle's rows into it with :func:`merge` (capped mode; streamed rows
stay in the parts) and uploads it whole, so with several writers the last upload wins and it
may lack rows. It is never the source of truth: readers (``compare``, the explorer, through
``_reader.Reader.table``) list the parts with :func:`part_paths`, then :func:`read` the
parts in that order and ``samples.json`` last. The logger builds rows with :func:`row` and
:func:`to_json`. Column names and paths come from :mod:`._layout`.

**One dedup rule, everywhere: the first row of an (epoch, sample_index) stands.** A later
row with the same key is dropped, both when the sender merges and when a reader reads
several sources. "First" is the same for every reader and writer: parts in the order of
:func:`part_paths` (epoch, then the time the epoch ended, then the writer's token), then
``samples.json``, whose rows all come from parts. Why the first: everything else an epoch
leaves in MLflow cannot be replaced either, and must agree with the table. MLflow keeps
every metric point and every image-series file logged at a step (the client can delete
neither), so "keep the last" would leave the first epoch's metric point and images beside
the table's new row. So the sender drops a whole
bundle that repeats an epoch the run already has (``Item.once``, see :mod:`._transport`), and
the table keeps the first row too: one row, one image and one metric point per step. A retried
bundle carries the same rows, so either rule gives the same table for a retry.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import _layout

__all__ = ["dumps", "held_by_view", "layer_columns", "loads", "merge", "overlay_cell", "part_paths",
           "read", "row", "to_json", "without_images"]

Key = Tuple[Any, ...]


def row(epoch: int, sample: Any, evr: np.ndarray, path: str,
        change: Optional[float] = None, card: Optional[dict] = None,
        signals: Optional[Dict[str, Optional[float]]] = None,
        overlay: Optional[dict] = None) -> dict:
    """One table row ``{column: value}`` for a ``samples.Sample`` at ``epoch``.

    Args:
        epoch: The logged epoch (the step); -1 while a streamed epoch is in progress.
        sample: Its ``index``, ``sample_id``, ``label``, ``pred``, ``correct``, boxes and
            masks (``iou``).
        evr: (k,) float explained-variance ratios.
        path: The card's artifact path, or ``""`` when it was not rendered (streaming).
        change: ``map_change`` against the previous logged epoch, None at the first.
        card: The card's geometry (``render.card_geometry``: size, panel boxes, titles), so
            readers crop its panels without guessing from pixels.
        signals: ``{name: value}`` of the sample's signals (``_layout.TABLE_SIGNAL_COLUMNS``;
            None: not scored); a column appears in the table when a row has it.
        overlay: What the explorer composites (``_layout.TABLE_OVERLAY_COLUMN``), see
            :func:`overlay_cell`.
    """
    r = {"epoch": epoch, "sample_index": int(sample.index), "sample_id": sample.sample_id,
         "label": sample.label, "prediction": sample.pred, "correct": sample.correct}
    if sample.pred_score is not None:
        r[_layout.TABLE_CONFIDENCE_COLUMN] = round(float(sample.pred_score), 4)
    for c, v in enumerate(evr):
        r[f"evr_{c + 1}"] = round(float(v), 6)
    r[_layout.TABLE_MAP_CHANGE_COLUMN] = None if change is None else round(float(change), 6)
    for name, value in (signals or {}).items():
        r[name] = None if value is None else round(float(value), 6)
    if sample.pred_boxes is not None or sample.label_boxes is not None:  # a detector's
        for column, boxes in zip(_layout.TABLE_BOX_COLUMNS, (sample.pred_boxes, sample.label_boxes)):
            r[column] = None if boxes is None else len(boxes)
    true_mask = getattr(sample, "label_mask", None)
    if getattr(sample, "pred_mask", None) is not None or true_mask is not None:  # a segmenter's
        iou_column, classes_column = _layout.TABLE_MASK_COLUMNS
        r[iou_column] = None if sample.iou is None else round(float(sample.iou), 6)
        r[classes_column] = None if true_mask is None else list(true_mask.names.values())
    if overlay is not None:
        r[_layout.TABLE_OVERLAY_COLUMN] = overlay
    if card is not None:
        r[_layout.TABLE_CARD_COLUMN] = card
    r[_layout.TABLE_IMAGE_COLUMN] = path
    return r


def layer_columns(layer: str, evr: np.ndarray, change: Optional[float] = None,
                  signals: Optional[Dict[str, Optional[float]]] = None) -> dict:
    """A further layer's columns of a row (``layers=[...]``; the first layer's are
    :func:`row`'s): ``layer4/evr_1`` ..., ``layer4/map_change``, ``layer4/{signal}``
    (``_layout.layer_column``), values as in :func:`row`."""
    names = [f"evr_{c + 1}" for c in range(len(evr))] + [_layout.TABLE_MAP_CHANGE_COLUMN]
    values = [float(v) for v in evr] + [change]
    names += list((signals or {}).keys())
    values += list((signals or {}).values())
    return {_layout.layer_column(layer, n): None if v is None else round(float(v), 6)
            for n, v in zip(names, values)}


def to_json(rows: List[dict]) -> bytes:
    """Rows as MLflow's table JSON (UTF-8), columns in the layout's order."""
    k = max((int(c[4:]) for r in rows for c in r if c.startswith("evr_")), default=0)
    columns = list(_layout.TABLE_COLUMNS) + [f"evr_{c}" for c in range(1, k + 1)] + \
        [_layout.TABLE_MAP_CHANGE_COLUMN] + \
        [c for c in _layout.TABLE_SIGNAL_COLUMNS if any(c in r for r in rows)] + \
        list(dict.fromkeys(c for r in rows for c in r if "/" in c)) + \
        [c for c in (_layout.TABLE_OVERLAY_COLUMN,) if any(c in r for r in rows)] + \
        [_layout.TABLE_CARD_COLUMN, _layout.TABLE_IMAGE_COLUMN]
    if any(_layout.TABLE_BOX_COLUMNS[0] in r for r in rows):  # a detector's table
        columns[len(_layout.TABLE_COLUMNS):len(_layout.TABLE_COLUMNS)] = _layout.TABLE_BOX_COLUMNS
    if any(_layout.TABLE_MASK_COLUMNS[0] in r for r in rows):  # a segmenter's table
        columns[len(_layout.TABLE_COLUMNS):len(_layout.TABLE_COLUMNS)] = _layout.TABLE_MASK_COLUMNS
    if any(_layout.TABLE_CONFIDENCE_COLUMN in r for r in rows):  # a classifier's, with its scores
        columns.insert(len(_layout.TABLE_COLUMNS), _layout.TABLE_CONFIDENCE_COLUMN)
    if any(_layout.TABLE_TRAIN_EPOCH_COLUMN in r for r in rows):
        columns.insert(1, _layout.TABLE_TRAIN_EPOCH_COLUMN)
    return dumps({"columns": columns, "data": [[r.get(c) for c in columns] for r in rows]})


def overlay_cell(at: int, shapes: Mapping[str, Sequence[int]], extent: Optional[Sequence[float]] = None,
                 pred_boxes: Any = None, true_boxes: Any = None) -> dict:
    """A row's ``overlay`` cell (``_layout.TABLE_OVERLAY_COLUMN``).

    Args:
        at: The sample's row in the epoch's maps PNG (``_layout.overlay_maps_path``).
        shapes: ``{layer: (k, h, w)}`` of its maps, each at its layer's own grid (``""``:
            the first layer).
        extent: ``(fy, fx)`` of the map the image covers (detectors' padding), or None.
        pred_boxes, true_boxes: ``samples.Boxes`` (or None): kept as ``[x1, y1, x2, y2,
            name(, score)]`` lists in input pixels, 0.1 px apart.
    """
    cell: Dict[str, Any] = {"at": int(at),
                            "layers": {name: [int(v) for v in shape] for name, shape in shapes.items()}}
    if extent is not None:
        cell["extent"] = [round(float(v), 6) for v in extent]
    for name, boxes in (("pred", pred_boxes), ("true", true_boxes)):
        if boxes is None:
            continue
        items = []
        for j, xyxy in enumerate(np.asarray(boxes.boxes, dtype=np.float64).reshape(-1, 4)):
            item: List[Any] = [round(float(v), 1) for v in xyxy] + [str(boxes.names[j])]
            if name == "pred" and boxes.scores is not None:
                item.append(round(float(boxes.scores[j]), 4))
            items.append(item)
        cell[name] = items
    return cell


def dumps(table: dict) -> bytes:
    """A split-orient table dict as UTF-8 JSON."""
    return json.dumps(table).encode("utf-8")


def loads(raw: Any) -> dict:
    """Parse table JSON (bytes or str) and check its shape.

    Raises:
        ValueError: not JSON, or not MLflow's split-orient table (columns and equal rows).
    """
    data = json.loads(raw if isinstance(raw, str) else bytes(raw).decode("utf-8"))
    if not (isinstance(data, dict) and isinstance(data.get("columns"), list)
            and isinstance(data.get("data"), list)
            and all(isinstance(r, list) and len(r) == len(data["columns"]) for r in data["data"])):
        raise ValueError("a table file is not MLflow's split-orient JSON")
    return data


def without_images(raw: bytes) -> bytes:
    """Table JSON whose rows name no card (``image`` = ``""``): for a bundle spooled without
    its images at the spool cap (:mod:`.sink`), so no row points at a file never uploaded."""
    table = loads(raw)
    if _layout.TABLE_IMAGE_COLUMN in table["columns"]:
        at = table["columns"].index(_layout.TABLE_IMAGE_COLUMN)
        for values in table["data"]:
            values[at] = ""
    if _layout.TABLE_OVERLAY_COLUMN in table["columns"]:  # its PNGs were not kept either
        at = table["columns"].index(_layout.TABLE_OVERLAY_COLUMN)
        for values in table["data"]:
            values[at] = None
    return dumps(table)


def _key(r: dict, fallback: Key) -> Key:
    epoch, index = r.get("epoch"), r.get("sample_index")
    return fallback if epoch is None or index is None else (int(epoch), int(index))


def merge(old: Optional[dict], new: dict) -> dict:
    """``old``'s rows, then ``new``'s rows whose (epoch, sample_index) ``old`` lacks (the
    first row stands, see the module docstring), in (epoch, sample_index) order as
    :func:`read` gives them (with uploads in flight, an epoch retried after a failure is
    merged after a later one; MLflow's UI shows the view's rows as they are). Columns:
    ``new``'s, plus any only ``old`` had (before the image column)."""
    if old is None:
        old = {"columns": [], "data": []}
    columns = list(new["columns"])
    for c in old["columns"]:
        if c not in columns:
            at = columns.index(_layout.TABLE_IMAGE_COLUMN) if _layout.TABLE_IMAGE_COLUMN in \
                columns else len(columns)
            columns.insert(at, c)
    rows: Dict[Key, dict] = {}
    for n, table in enumerate((old, new)):
        for i, values in enumerate(table["data"]):
            r = dict(zip(table["columns"], values))
            rows.setdefault(_key(r, ("#", n, i)), r)
    keys = list(rows)
    if all(isinstance(k[0], int) for k in keys):  # no row without its key: sortable
        keys.sort()
    return {"columns": columns, "data": [[rows[k].get(c) for c in columns] for k in keys]}


def read(sources: Sequence[Tuple[str, bytes]]) -> Tuple[List[str], List[dict]]:
    """Columns and rows of a table kept in several files (the parts in :func:`part_paths`'
    order, then ``samples.json``), deduplicated by (epoch, sample_index) (the first row stands) and sorted by
    that key.

    Raises:
        ValueError: a source that is not an EigenCAM table (named in the message).
    """
    columns: List[str] = []
    by_key: Dict[Key, dict] = {}
    for path, data in sources:
        try:
            table = loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not an EigenCAM table ({exc})") from exc
        cols = [str(c) for c in table["columns"]]
        missing = [c for c in ("epoch", "sample_id", _layout.TABLE_IMAGE_COLUMN) if c not in cols]
        if missing:
            raise ValueError(f"{path} lacks column(s) {', '.join(missing)}")
        columns += [c for c in cols if c not in columns]
        for i, values in enumerate(table["data"]):
            r = dict(zip(cols, values))
            try:
                key = (int(r["epoch"]), int(r["sample_index"] if r.get("sample_index")
                                            is not None else i))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}: bad epoch or sample_index in row {i} ({exc})") from exc
            by_key.setdefault(key, r)
    return columns, [by_key[k] for k in sorted(by_key)]


def part_paths(list_artifacts: Callable[[str], Iterable[Any]], mode: str,
               ds_id: Optional[str]) -> List[str]:
    """Artifact paths of the table parts of (mode, ds_id), in reading order: by epoch, then
    by when the epoch ended, then by writer (the order that decides which row is "first").

    Args:
        list_artifacts: folder -> its entries: paths (``str``), or objects with ``.path``
            (and ``.is_dir``) such as MLflow's ``FileInfo``
            (``lambda p: client.list_artifacts(run_id, p)``); may raise FileNotFoundError
            or return nothing for a missing folder.
    """
    folder = _layout.table_parts_dir(mode, ds_id)
    try:
        entries = list(list_artifacts(folder))
    except FileNotFoundError:
        return []
    parts = []
    for entry in entries:
        if getattr(entry, "is_dir", False):
            continue
        path = str(getattr(entry, "path", entry))
        if "/" not in path:
            path = f"{folder}/{path}"
        m = _layout.TABLE_PART_RE.match(path.rsplit("/", 1)[-1])
        if m and path.startswith(folder + "/"):
            parts.append(((int(m.group(1)), int(m.group(2)), m.group(3)), path))
    return [p for _, p in sorted(parts)]


def held_by_view(entries: Iterable[Any], view: Optional[bytes]) -> List[str]:
    """Paths of the parts (of ``entries``: a listing of the parts' folder, objects with
    ``.path`` and ``.file_size`` such as MLflow's ``FileInfo``) whose rows ``samples.json``
    (``view``) already holds as they are, so that a reader can skip downloading them: 300
    parts of 10 runs x 30 epochs are 300 round trips before the first row can be shown.

    A part is held when it is its epoch's only part (one writer; several are always read,
    their order decides which row stands) and the view's rows of that epoch, written out
    again with :func:`to_json` (the function the logger wrote the part with), are exactly as
    long as the part. The sender puts the same rows in the part and in the view, so a view
    that the last writer rewrote without them, or with other rows of that epoch, differs in
    size and the part is read: reading the view in their place gives what :func:`read`
    gives from every part (the first row stands), without the downloads.
    """
    if view is None:
        return []
    try:
        table = loads(view)
    except (ValueError, UnicodeDecodeError):
        return []  # read() names the bad file
    by_epoch: Dict[int, List[Any]] = {}
    for entry in entries:
        m = _layout.TABLE_PART_RE.match(str(getattr(entry, "path", entry)).rsplit("/", 1)[-1])
        if m and not getattr(entry, "is_dir", False):
            by_epoch.setdefault(int(m.group(1)), []).append(entry)
    rows: Dict[int, List[dict]] = {}
    for values in table["data"]:
        r = dict(zip(table["columns"], values))
        if isinstance(r.get("epoch"), int):
            rows.setdefault(r["epoch"], []).append(r)
    held = []
    for epoch, parts in by_epoch.items():
        size = getattr(parts[0], "file_size", None)
        if len(parts) == 1 and epoch in rows and isinstance(size, int) and \
                len(to_json(rows[epoch])) == size:
            held.append(str(parts[0].path))
    return held
