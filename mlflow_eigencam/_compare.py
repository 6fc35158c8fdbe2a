"""Compare EigenCAM overlays across epochs, runs and experiments.

Rows are samples, matched across runs by ``sample_id`` (a hash of the image's pixels, so the
same validation image matches whichever run or experiment logged it); columns are the input
image, then one column per (run, epoch) showing the overlay of one principal component.
Everything is read back from what :class:`~mlflow_eigencam.logger.EigenCAMLogger` wrote
(see :mod:`mlflow_eigencam._layout`): the per-(mode, ds_id) table ``samples.json`` and the
per-sample strip PNGs it points to. Nothing is recomputed.

Output:

* ``.png``: one image for a quick look. Deterministic bytes for equal inputs. When a run
  was given without an epoch selection and logged more than ``png_max_epochs`` epochs,
  that many are shown, evenly spaced, first and last included, and a note says so.
* ``.html`` / ``.htm``: one self-contained page (images as ``data:`` URIs, inline CSS, no
  scripts, no external resources) with every selected epoch, in a scrollable table.

Samples that are not in every run are not dropped silently: they are returned, printed by
the CLI and listed at the bottom of the PNG and in an "Unmatched samples" section of the page.
A sample that every run logged, but not at every selected epoch (a shuffled evaluation
subset), is a row with a grey "not logged" cell where it is missing.

Epoch selections (``RUN_ID@EPOCHS``, ``--epochs``): comma-separated items, each an epoch
(``4``; it must have been logged), a range (``0-9``; the logged epochs in it, at least one),
``first``, ``last`` or ``all``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import html
import numbers
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _layout
from ._reader import Reader, cell_bool, check_tracking_uri
from .render import _clean, _fit, _font, _line_height, _text_width, encode_png

__all__ = ["CompareResult", "RunColumns", "add_compare_parser", "compare", "parse_epochs",
           "strip_panels"]

#: Epochs shown per run in a PNG when the run was given without an epoch selection.
PNG_MAX_EPOCHS = 8

Box = Tuple[int, int, int, int]  # x, y, width, height

# The strip layout and colours of render.render_strip, taken from render.py itself so the
# panel geometry computed here cannot drift from what was drawn.
from .render import _BACKGROUND, _FONT_SIZE as _STRIP_FONT_SIZE, _GAP as _STRIP_GAP  # noqa: E402
from .render import _MUTED, _OK, _TEXT, _WRONG, _TILE_COL_GAP, _grid_shape  # noqa: E402
from .render import tile_layout  # noqa: E402

_BG = _BACKGROUND[0]

# Layout of the comparison image, in pixels.
_MARGIN = 8
_COL_GAP = 4
_RUN_GAP = 14  # before each run's group of columns, a rule in its middle
_ROW_GAP = 10
_BAR = 3  # correct / wrong bar under each overlay
_WHITE = _BACKGROUND
_RULE = (200, 200, 200)
_EMPTY = (236, 236, 236)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RunColumns:
    """One run's group of columns.

    Attributes:
        run_id: The MLflow run id.
        run_name: The run's name ("" when it has none).
        experiment: Name of the run's experiment.
        epochs: Epochs shown, ascending.
        logged_epochs: Every epoch the run logged for this (mode, ds_id), ascending.
    """

    run_id: str
    run_name: str
    experiment: str
    epochs: Tuple[int, ...]
    logged_epochs: Tuple[int, ...]


@dataclass(frozen=True)
class CompareResult:
    """What :func:`compare` wrote.

    Attributes:
        path: The PNG or HTML file written.
        runs: Column groups, in the order given (runs first, then ``--experiment`` picks).
        matched: Sample ids present in every run, in row order.
        unmatched: ``{run_id: sample ids that run logged but some other run did not}``,
            an entry for every run (empty when all of its samples matched).
        labels: ``{sample_id: label}`` for every sample seen (None when unlabelled).
        notes: Human-readable notes (epochs left out of a PNG, strips that were missing).
    """

    path: Path
    runs: Tuple[RunColumns, ...]
    matched: Tuple[str, ...]
    unmatched: Dict[str, Tuple[str, ...]]
    labels: Dict[str, Optional[str]] = field(default_factory=dict)
    notes: Tuple[str, ...] = ()

    @property
    def columns(self) -> List[Tuple[str, int]]:
        """``(run_id, epoch)`` of every overlay column, left to right (the input column excluded)."""
        return [(r.run_id, e) for r in self.runs for e in r.epochs]


# --------------------------------------------------------------------------- epoch specs

_ITEM = re.compile(r"^(?:(?P<a>\d+)(?:-(?P<b>\d+))?|(?P<word>first|last|all))$")


def _check_epoch_spec(spec: str) -> List[Tuple[str, int, int]]:
    """Syntax check of an EPOCHS spec -> items ("epoch"|"range"|"first"|"last"|"all", a, b)."""
    if not isinstance(spec, str):
        raise TypeError(f"EPOCHS must be a string such as '0,4,9', '0-9', 'last' or 'all', got {spec!r}")
    items = []
    for raw in spec.split(","):
        item = raw.strip().lower()
        m = _ITEM.match(item)
        if m is None:
            raise ValueError(f"bad EPOCHS spec {spec!r}: item {raw.strip()!r} is not an epoch (4), "
                             "a range (0-9), 'first', 'last' or 'all'")
        if m.group("word"):
            items.append((m.group("word"), 0, 0))
        elif m.group("b") is not None:
            a, b = int(m.group("a")), int(m.group("b"))
            if b < a:
                raise ValueError(f"bad EPOCHS spec {spec!r}: range {item!r} runs backwards")
            items.append(("range", a, b))
        else:
            items.append(("epoch", int(m.group("a")), 0))
    return items


def parse_epochs(spec: Optional[str], logged: Iterable[int], *, what: str = "the run") -> List[int]:
    """Resolve an EPOCHS spec against the epochs a run logged.

    Args:
        spec: ``"0,4,9"``, ``"0-9"``, ``"first"``, ``"last"``, ``"all"``, a mix joined by
            commas, or None (all).
        logged: Epochs the run logged.
        what: How to name the run in error messages.

    Returns:
        Selected epochs, ascending, without repeats.

    Raises:
        ValueError: The spec is not of that form.
        LookupError: An epoch (or a whole range) that was not logged; the message lists the
            logged epochs.
    """
    logged_sorted = sorted({int(e) for e in logged})
    items = _check_epoch_spec("all" if spec is None else spec)
    if not logged_sorted:
        raise LookupError(f"{what} logged no epochs")
    chosen = set()
    for kind, a, b in items:
        if kind == "all":
            chosen.update(logged_sorted)
        elif kind == "first":
            chosen.add(logged_sorted[0])
        elif kind == "last":
            chosen.add(logged_sorted[-1])
        elif kind == "epoch":
            if a not in logged_sorted:
                raise LookupError(f"epoch {a} was not logged by {what}; logged epochs: "
                                  f"{_epoch_list(logged_sorted)}")
            chosen.add(a)
        else:
            inside = [e for e in logged_sorted if a <= e <= b]
            if not inside:
                raise LookupError(f"no epoch in {a}-{b} was logged by {what}; logged epochs: "
                                  f"{_epoch_list(logged_sorted)}")
            chosen.update(inside)
    return sorted(chosen)


def _epoch_list(epochs: Sequence[int], limit: int = 30) -> str:
    if len(epochs) <= limit:
        return ", ".join(str(e) for e in epochs)
    head = ", ".join(str(e) for e in epochs[: limit - 3])
    return f"{head}, ... {', '.join(str(e) for e in epochs[-3:])} ({len(epochs)} epochs)"


def _evenly(epochs: Sequence[int], n: int) -> List[int]:
    """``n`` of ``epochs``, evenly spaced, first and last included."""
    if len(epochs) <= n:
        return list(epochs)
    if n == 1:
        return [epochs[-1]]
    idx = sorted({round(i * (len(epochs) - 1) / (n - 1)) for i in range(n)})
    return [epochs[i] for i in idx]


def _split_at(text: str) -> Tuple[str, Optional[str]]:
    """``"ID@EPOCHS"`` -> ("ID", "EPOCHS"); no ``@`` -> ("ID", None)."""
    if "@" in text:
        head, spec = text.rsplit("@", 1)
        return head, spec
    return text, None


# --------------------------------------------------------------------------- strips


def strip_panels(strip: np.ndarray, k: int, *, caption: bool = True) -> List[Box]:
    """Boxes of the ``k + 1`` panels (input, PC1..PCk) of a logged sample image.

    Two arrangements are read (see ``render.render_strip``): the card (``"tiles"``, what the
    logger draws now) and the row strip of older runs. The card's geometry follows from its
    size and ``k`` alone (:func:`render.tile_layout`); it is checked on the pixels (blank
    gaps around every panel, nothing in the empty cells, the input and the first overlay
    differing) and, failing that, the row strip is tried.

    Row strips: the panels are equally wide and ``4`` px apart and around, so the width
    follows from the strip's width alone. The top and height follow from the caption font's
    line height; when the strip disagrees with that (rendered where Pillow had another
    default font), they are found from the pixels instead: rows where the input panel and
    the first overlay differ form the panel band (the title and caption bands are separated
    from it by blank rows).

    Args:
        strip: ``(H, W, 3)`` uint8, as logged.
        k: Components drawn in it (the row's number of ``evr_*`` values).
        caption: Whether the strip has a caption (the logger always draws one); the other
            case is tried too.

    Returns:
        ``[(x, y, width, height), ...]``, ``k + 1`` boxes, input first.

    Raises:
        ValueError: Neither a card nor a row strip of ``k + 1`` panels fits the image.
    """
    arr = np.asarray(strip)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"strip must be (H, W, 3), got shape {arr.shape}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    tiles = _tile_panels(arr, int(k) + 1, caption)
    if tiles is not None:
        return tiles
    try:
        return _row_panels(arr, int(k), caption)
    except ValueError as exc:
        height, width = arr.shape[:2]
        cols, rows = _grid_shape(int(k) + 1)
        raise ValueError(f"a {width} x {height} image holds neither a card of {int(k) + 1} "
                         f"panels ({cols} x {rows}) nor a row of them ({exc}); was it made by "
                         f"render_strip with {k} component(s)?") from None


def _tile_panels(arr: np.ndarray, n: int, caption: bool) -> Optional[List[Box]]:
    """The panel boxes of a card of ``n`` panels, or None if the pixels say it is not one."""
    height, width = arr.shape[:2]
    gap = _STRIP_GAP
    cols, rows = _grid_shape(n)
    spare = width - 2 * gap - (cols - 1) * _TILE_COL_GAP
    if spare % cols or spare // cols < 1:
        return None
    pw = spare // cols
    for has_caption in (caption, not caption):
        probe = tile_layout((1, pw), n, caption=has_caption)  # everything but the panel height
        extra = probe["size"][0] - rows * 1
        if (height - extra) % rows or (height - extra) // rows < 1:
            continue
        geo = tile_layout(((height - extra) // rows, pw), n, caption=has_caption)
        if geo["size"] == (height, width) and _tiles_plausible(arr, geo, n):
            return list(geo["boxes"])
    return None


def _tiles_plausible(arr: np.ndarray, geo: dict, n: int) -> bool:
    gap, bg = _STRIP_GAP, _BG
    cols, rows = geo["cols"], geo["rows"]
    (x0, y0, pw, ph) = geo["boxes"][0]
    for r in range(rows):
        top = geo["boxes"][r * cols][1]  # every row starts with a panel
        # Blank rows right above and below the row of panels (x >= gap: the left margin
        # holds the correct / wrong bar).
        if not (arr[top - gap:top, gap:] == bg).all() or not (arr[top + ph:top + ph + gap, gap:] == bg).all():
            return False
        # Blank columns between the panels and in the right margin.
        for c in range(cols):
            x = gap + c * (pw + _TILE_COL_GAP) + pw
            if not (arr[top:top + ph, x:x + (_TILE_COL_GAP if c < cols - 1 else gap)] == bg).all():
                return False
        for i in range(n, rows * cols):  # empty cells are white, title included
            if r == i // cols:
                x = gap + (i % cols) * (pw + _TILE_COL_GAP)
                if not (arr[top - gap - geo["line"]:top + ph, x:x + pw] == bg).all():
                    return False
    boxes = geo["boxes"]
    inp = arr[y0:y0 + ph, x0:x0 + pw]
    for x, y, w, h in boxes[1:]:
        # An overlay is never blank (a missing panel would be), and has no white row or
        # column unless it equals the input (alpha=0): those are gaps between a card's cells.
        panel = arr[y:y + h, x:x + w]
        white = panel == bg
        if white.all():
            return False
        if not (panel == inp).all() and (white.all(axis=(1, 2)).any() or white.all(axis=(0, 2)).any()):
            return False
    if n > 1:
        (ax, ay, _, _), (bx, by, _, _) = boxes[0], boxes[1]
        a, b = arr[ay:ay + ph, ax:ax + pw], arr[by:by + ph, bx:bx + pw]
        if not (a == b).all():  # identical panels (alpha=0) prove nothing either way
            diff = (a != b).any(axis=(1, 2))
            return bool(diff[0] and diff[-1])
    return True


def _row_panels(arr: np.ndarray, k: int, caption: bool) -> List[Box]:
    """The panel boxes of a row strip (the arrangement of runs logged before the card)."""
    height, width = arr.shape[:2]
    gap, n = _STRIP_GAP, int(k) + 1
    if (width - gap) % n or (width - gap) // n - gap < 1:
        raise ValueError(f"a strip {width} px wide does not hold {n} panels of equal width "
                         f"({gap} px apart)")
    pw = (width - gap) // n - gap
    xs = [gap + i * (pw + gap) for i in range(n)]

    line_h = _line_height(_font(_STRIP_FONT_SIZE))
    top = 2 * gap + line_h
    candidates: List[Tuple[int, int]] = []
    for has_caption in (caption, not caption):
        ph = height - top - gap - ((line_h + gap) if has_caption else 0)
        if ph >= 1 and _plausible(arr, xs, pw, top, ph):
            candidates.append((top, ph))
    if not candidates and n > 1:
        found = _panel_band(arr, xs, pw)
        # Another font moves the band by a few rows, not by more than two lines of text: a
        # band far from both ends is one row of a card's panels, not a strip's.
        if found is not None and (found[0] > top + 2 * line_h
                                  or height - found[0] - found[1] > 3 * (line_h + gap)):
            raise ValueError(f"the {n} panels found in a strip {width} x {height} px leave "
                             "too much above or below them")
        if found is not None:
            candidates.append(found)
    if not candidates and n == 1:
        raise ValueError(f"no blank rows around one panel in a strip {width} x {height} px")
    if not candidates:  # nothing to go by (e.g. alpha=0): trust the layout
        candidates.append((top, max(1, height - top - gap - ((line_h + gap) if caption else 0))))
    problem = ""
    for y, ph in candidates:
        problem = _row_problem(arr, xs, pw, y, ph)
        if not problem:
            return [(x, y, pw, ph) for x in xs]
    raise ValueError(problem)


def _row_problem(arr: np.ndarray, xs: List[int], pw: int, y: int, ph: int) -> str:
    """Why the band ``y:y + ph`` is not a row strip's panels ("" if it is)."""
    gap, (height, width) = _STRIP_GAP, arr.shape[:2]
    # The columns between panels (and the right margin) are blank through the panel band;
    # a wrong k (or a caption taken for panel rows) puts them inside a panel.
    band = arr[y:y + ph]
    for x in xs:
        if not (band[:, x + pw:x + pw + gap] == _BG).all():
            return (f"a strip {width} px wide does not hold {len(xs)} panels here: column "
                    f"{x + pw} is not a gap")
    if len(xs) > 1:
        # An overlay has no white row (the heat is never white), unless it is the input
        # itself (alpha=0); a white row inside the band is the gap between a card's rows.
        a, b = band[:, xs[0]:xs[0] + pw], band[:, xs[1]:xs[1] + pw]
        if not (a == b).all() and (b == _BG).all(axis=(1, 2)).any():
            return f"the panel band of a strip {width} x {height} px has a blank row"
    return ""


def _plausible(arr: np.ndarray, xs: List[int], pw: int, top: int, ph: int) -> bool:
    """Blank gap rows right above and below the band; input and overlay differ at its edges."""
    gap, width = _STRIP_GAP, arr.shape[1]
    bottom = top + ph
    if top < gap or bottom + gap > arr.shape[0]:
        return False
    # x >= gap: the left margin holds the correct/wrong bar.
    if not (arr[top - gap:top, gap:width - gap] == _BG).all():
        return False
    if not (arr[bottom:bottom + gap, gap:width - gap] == _BG).all():
        return False
    if len(xs) > 1:
        a = arr[top:bottom, xs[0]:xs[0] + pw]
        b = arr[top:bottom, xs[1]:xs[1] + pw]
        if not (a == b).all():  # identical panels (alpha=0) prove nothing either way
            rows = (a != b).any(axis=(1, 2))
            return bool(rows[0] and rows[-1])
    return True


def _panel_band(arr: np.ndarray, xs: List[int], pw: int) -> Optional[Tuple[int, int]]:
    """(top, height) of the longest run of rows where the input and the first overlay differ."""
    a = arr[:, xs[0]:xs[0] + pw]
    b = arr[:, xs[1]:xs[1] + pw]
    rows = (a != b).any(axis=(1, 2))
    best: Optional[Tuple[int, int]] = None
    start = None
    for y, d in enumerate([*rows.tolist(), False]):
        if d and start is None:
            start = y
        elif not d and start is not None:
            if best is None or y - start > best[1]:
                best = (start, y - start)
            start = None
    # Text lines are a few rows; a real panel band is taller than a line of text.
    if best is None or best[1] <= 2 * _line_height(_font(_STRIP_FONT_SIZE)):
        return None
    return best


# --------------------------------------------------------------------------- reading MLflow


@dataclass
class _Run:
    spec_epochs: Optional[str]
    run_id: str
    run_name: str
    experiment: str
    rows: List[dict]  # table rows of this (mode, ds_id)
    n_evr: int
    logged: List[int]
    epochs: List[int] = field(default_factory=list)
    by_sample: Dict[str, Dict[int, dict]] = field(default_factory=dict)  # sid -> epoch -> row
    order: List[str] = field(default_factory=list)  # sample ids, first appearance


def _no_data_message(reader: Reader, run, mode: str, ds_id: Optional[str]) -> str:
    rid = run.info.run_id
    have = reader.available(run)
    msg = (f"run {rid} has no EigenCAM data for mode={mode!r}, ds_id={ds_id!r} "
           f"(no {_layout.table_path(mode, ds_id)})")
    if not have:
        return msg + "; it has no EigenCAM data at all"
    listed = ", ".join(f"mode={m!r} ds_id={None if d == _layout.ALL_DS else d!r}" for m, d in have)
    return msg + f"; it has: {listed}"


def _load_run(reader: Reader, run, spec: Optional[str], mode: str, ds_id: Optional[str],
              component: int) -> _Run:
    rid = run.info.run_id
    if not reader.has_table(run, mode, ds_id):
        raise LookupError(_no_data_message(reader, run, mode, ds_id))
    table = reader.table(rid, mode, ds_id)
    rows, columns = table.rows, table.columns
    n_evr = sum(1 for c in columns if re.fullmatch(r"evr_\d+", c))
    if component > n_evr:
        raise LookupError(f"run {rid} logged {n_evr} component(s) for mode={mode!r}, "
                          f"ds_id={ds_id!r}; component {component} was asked for")
    name = run.data.tags.get("mlflow.runName") or getattr(run.info, "run_name", None) or ""
    r = _Run(spec, rid, str(name), reader.experiment_name(run.info.experiment_id), rows, n_evr,
             sorted({int(row["epoch"]) for row in rows}))
    return r


# --------------------------------------------------------------------------- cells


@dataclass
class _Cell:
    panel: Optional[np.ndarray]  # (h, w, 3) uint8, None: nothing to show
    empty_text: str = ""
    pred: Optional[str] = None
    correct: Optional[bool] = None
    evr: Optional[float] = None


def _row_k(row: dict, n_evr: int) -> int:
    return sum(1 for c in range(1, n_evr + 1) if row.get(f"evr_{c}") is not None)


def _text(v: Any) -> Optional[str]:
    return None if v is None else _clean(v)


# --------------------------------------------------------------------------- the feature


def compare(
    runs: Union[str, Sequence[str]] = (),
    *,
    experiments: Union[str, Sequence[str], None] = None,
    mode: str = "eval",
    ds_id: Optional[str] = None,
    component: int = 1,
    out: Union[str, os.PathLike] = "compare.png",
    tracking_uri: Optional[str] = None,
    epochs: Optional[str] = None,
    png_max_epochs: int = PNG_MAX_EPOCHS,
    sample_ids: Optional[Sequence[str]] = None,
) -> CompareResult:
    """Write a side-by-side comparison of EigenCAM overlays across epochs, runs and experiments.

    Args:
        runs: Run ids (or a unique prefix of 4+ characters, as the CLI prints them), each
            optionally ``"RUN_ID@EPOCHS"`` (see the module docstring).
        experiments: Experiment names, each optionally ``"NAME@EPOCHS"``: the latest active
            run of each that has EigenCAM data for (mode, ds_id) joins the comparison.
        mode: The mode the samples were logged under ("eval", "test", ...).
        ds_id: The dataset id they were logged under (None: logged without one).
        component: Which principal component's overlay to show, 1-based.
        out: Output file; ``.png`` or ``.html`` / ``.htm`` picks the format. Parent folders
            are created.
        tracking_uri: Where the runs live; default ``mlflow.get_tracking_uri()`` (which
            honours ``MLFLOW_TRACKING_URI``).
        epochs: EPOCHS for runs given without ``@EPOCHS`` (default: all; for a PNG at most
            ``png_max_epochs`` of them, evenly spaced).
        png_max_epochs: See ``epochs``.
        sample_ids: Only these matched samples, in this order (the explorer's filtered
            rows); None: every matched sample.

    Returns:
        A :class:`CompareResult`: the path written, the matched sample ids, the unmatched
        ones per run.

    Raises:
        ValueError: A bad EPOCHS spec, component, output suffix, or unreadable table.
        LookupError: An unknown run or experiment, a run without EigenCAM data for
            (mode, ds_id) (the message names what it has), an epoch that was not logged
            (the message names the logged ones).
        ConnectionError: The tracking server does not answer.
    """
    run_specs = [runs] if isinstance(runs, str) else list(runs or [])
    exp_specs = [experiments] if isinstance(experiments, str) else list(experiments or [])
    if not run_specs and not exp_specs:
        raise ValueError("compare needs at least one run id or experiment name")
    if not isinstance(mode, str) or not mode:
        raise ValueError(f"mode must be a non-empty string such as 'eval', got {mode!r}")
    if isinstance(component, bool) or not isinstance(component, numbers.Integral) or component < 1:
        raise ValueError(f"component must be an int >= 1 (1 = the first principal component), "
                         f"got {component!r}")
    component = int(component)
    if isinstance(png_max_epochs, bool) or not isinstance(png_max_epochs, numbers.Integral) \
            or png_max_epochs < 1:
        raise ValueError(f"png_max_epochs must be an int >= 1, got {png_max_epochs!r}")
    out_path = Path(out)
    fmt = out_path.suffix.lower()
    if fmt not in (".png", ".html", ".htm"):
        raise ValueError(f"out must end in .png, .html or .htm, got {str(out)!r}")
    # Check every spec's syntax before talking to MLflow.
    parsed_runs = [_split_at(str(s)) for s in run_specs]
    for rid, spec in parsed_runs:
        if not rid:
            raise ValueError(f"empty run id in {run_specs!r}")
        if spec is not None:
            _check_epoch_spec(spec)
    if epochs is not None:
        _check_epoch_spec(epochs)

    import mlflow

    from ._transport import probe

    uri = check_tracking_uri(str(tracking_uri or mlflow.get_tracking_uri()))
    if not probe(uri):
        raise ConnectionError(f"cannot reach MLflow at {uri}")
    only = None if sample_ids is None else [str(s) for s in sample_ids]

    with _quiet_downloads():
        reader = Reader(uri)
        selected: List[Tuple[Any, Optional[str]]] = []
        for rid, spec in parsed_runs:
            selected.append((reader.run(rid), spec))
        for text in exp_specs:
            name, spec = str(text), None
            if reader.client.get_experiment_by_name(name) is None and "@" in name:
                name, spec = _split_at(name)
                _check_epoch_spec(spec)
            selected.append((reader.latest_run_with_data(name, mode, ds_id), spec))

        loaded = [_load_run(reader, run, spec, mode, ds_id, component) for run, spec in selected]
        notes: List[str] = []
        for r in loaded:
            spec = r.spec_epochs if r.spec_epochs is not None else epochs
            r.epochs = parse_epochs(spec, r.logged, what=f"run {r.run_id} (mode={mode!r}, ds_id={ds_id!r})")
            if spec is None and fmt == ".png" and len(r.epochs) > png_max_epochs:
                r.epochs = _evenly(r.epochs, png_max_epochs)
                notes.append(f"run {r.run_id}: {len(r.epochs)} of {len(r.logged)} logged epochs "
                             f"shown, evenly spaced; pass {r.run_id}@all or write .html for all")
            wanted = set(r.epochs)
            for row in r.rows:
                e = int(row["epoch"])
                if e not in wanted:
                    continue
                sid = str(row["sample_id"])
                if sid not in r.by_sample:
                    r.by_sample[sid] = {}
                    r.order.append(sid)
                # A repeated image within one epoch: the first (lowest sample_index) stands.
                r.by_sample[sid].setdefault(e, row)

        common = set(loaded[0].by_sample)
        for r in loaded[1:]:
            common &= set(r.by_sample)
        matched = [sid for sid in _first_seen(loaded) if sid in common]
        if only is not None:  # the rows the caller asked for, in its order
            matched = [sid for sid in dict.fromkeys(only) if sid in common]
        unmatched: Dict[str, List[str]] = {}
        for r in loaded:  # a run given twice (two epoch selections) is listed once
            listed = unmatched.setdefault(r.run_id, [])
            listed += [s for s in r.order if s not in common and s not in listed]
        labels: Dict[str, Optional[str]] = {}
        for r in loaded:
            for sid in r.order:
                if sid not in labels:
                    first = next(iter(r.by_sample[sid].values()))
                    labels[sid] = _text(first.get("label"))

        strips = _fetch_strips(reader, loaded, set(matched), mode, ds_id)
        grid, inputs = _cells(loaded, matched, strips, component, notes)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    result_runs = tuple(RunColumns(r.run_id, r.run_name, r.experiment, tuple(r.epochs),
                                   tuple(r.logged)) for r in loaded)
    result = CompareResult(out_path, result_runs, tuple(matched),
                           {k: tuple(v) for k, v in unmatched.items()}, labels, tuple(notes))
    title = f"EigenCAM PC{component} | mode {mode} | ds_id {ds_id if ds_id is not None else '(none)'}"
    if fmt == ".png":
        out_path.write_bytes(encode_png(_render_png(result, grid, inputs, title, component)))
    else:
        out_path.write_text(_render_html(result, grid, inputs, title, component, uri), encoding="utf-8")
    return result


@contextlib.contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No MLflow progress bar per downloaded strip (hundreds of them), unless the user set one."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if name in os.environ:
        yield
        return
    os.environ[name] = "false"
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _first_seen(loaded: List[_Run]) -> List[str]:
    seen: List[str] = []
    done = set()
    for r in loaded:
        for sid in r.order:
            if sid not in done:
                done.add(sid)
                seen.append(sid)
    return seen


def _fetch_strips(reader: Reader, loaded: List[_Run], wanted: set, mode: str,
                  ds_id: Optional[str]) -> Dict[Tuple[str, int, int], Optional[np.ndarray]]:
    """{(run_id, epoch, sample_index): strip or None (missing)} for every cell to draw.

    ``wanted``: the matched sample ids (every selected epoch); of the others only the first
    selected epoch is fetched, for the input image shown in the unmatched list.
    """
    import io

    from PIL import Image

    jobs: Dict[Tuple[str, int, int], dict] = {}  # ordered
    for r in loaded:
        for sid in r.order:
            # Every cell of a matched sample; one strip (for its input image) of the others.
            epochs = r.epochs if sid in wanted else [min(r.by_sample[sid])]
            for e in epochs:
                row = r.by_sample[sid].get(e)
                if row is not None:
                    jobs[_strip_key(r.run_id, row)] = row

    def load(key):
        data = reader.strip(key[0], mode, ds_id, jobs[key])
        if data is None:
            return None
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB")).copy()

    # Remote stores answer one request per file: a few at a time. Order does not matter for
    # the output (results are keyed), so the bytes stay deterministic.
    if not reader.remote:
        return {k: load(k) for k in jobs}
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(jobs, pool.map(load, jobs)))


def _strip_key(run_id: str, row: dict) -> Tuple[str, int, int]:
    return run_id, int(row["epoch"]), int(row.get("sample_index", -1))


def _cells(loaded: List[_Run], matched: List[str],
           strips: Dict[Tuple[str, int, int], Optional[np.ndarray]], component: int,
           notes: List[str]) -> Tuple[Dict[Tuple[int, str, int], _Cell], Dict[str, np.ndarray]]:
    """Crop the panels: {(run position, sample_id, epoch): cell}, {sample_id: input panel}.

    Cells for matched samples only; input panels for every sample that has a strip (the
    unmatched list shows them too).
    """
    grid: Dict[Tuple[int, str, int], _Cell] = {}
    inputs: Dict[str, np.ndarray] = {}
    missing = 0
    wanted = set(matched)
    for pos, r in enumerate(loaded):
        for sid in r.order:
            full = sid in wanted
            for e in (r.epochs if full else [min(r.by_sample[sid])]):
                row = r.by_sample[sid].get(e)
                if row is None:
                    grid[(pos, sid, e)] = _Cell(None, "not logged")
                    continue
                strip = strips.get(_strip_key(r.run_id, row))
                k = _row_k(row, r.n_evr)
                boxes = strip_panels(strip, k) if strip is not None else []
                if boxes and sid not in inputs:
                    x, y, w, h = boxes[0]
                    inputs[sid] = strip[y:y + h, x:x + w].copy()
                if not full:
                    continue
                evr = row.get(f"evr_{component}")
                cell = _Cell(None, "", _text(row.get("prediction")), cell_bool(row.get("correct")),
                             None if evr is None else float(evr))
                if not boxes and not row.get(_layout.TABLE_IMAGE_COLUMN):
                    cell.empty_text = "not rendered"  # streamed, and no renderer here
                elif not boxes:
                    missing += 1
                    cell.empty_text = "strip missing"
                elif component > k:
                    cell.empty_text = f"no PC{component}"
                else:
                    x, y, w, h = boxes[component]
                    cell.panel = strip[y:y + h, x:x + w].copy()
                grid[(pos, sid, e)] = cell
    if missing:
        notes.append(f"{missing} strip(s) listed in the tables could not be downloaded "
                     "(shown as 'strip missing')")
    return grid, inputs


# --------------------------------------------------------------------------- PNG


def _caption_pred(cell: _Cell) -> Tuple[str, str]:
    """(text, mark) for the prediction line."""
    text = f"pred: {cell.pred}" if cell.pred is not None else "pred: -"
    mark = "" if cell.correct is None else ("[OK]" if cell.correct else "[X]")
    return text, mark


def _evr_text(cell: _Cell, component: int) -> str:
    if cell.evr is None or not np.isfinite(cell.evr):
        return f"PC{component} n/a"
    return f"PC{component} {cell.evr * 100:.1f}%"


def _short(run_id: str) -> str:
    return run_id[:8]


def _wrap(font, words: List[str], width: int) -> List[str]:
    lines: List[str] = []
    line = ""
    for w in words:
        candidate = f"{line} {w}".strip()
        if line and _text_width(font, candidate) > width:
            lines.append(line)
            line = w
        else:
            line = candidate
    if line:
        lines.append(line)
    return [_fit(font, ln, width) for ln in lines]


def _render_png(result: CompareResult, grid: Dict[Tuple[int, str, int], _Cell],
                inputs: Dict[str, np.ndarray], title: str, component: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    font, big = _font(_STRIP_FONT_SIZE), _font(16)
    lh, blh = _line_height(font), _line_height(big)
    panels = [c.panel for c in grid.values() if c.panel is not None]
    panels += [p for p in inputs.values() if p is not None]
    cw = max([p.shape[1] for p in panels], default=128)
    ch = max([p.shape[0] for p in panels], default=128)

    # Column x positions: the input, then each run's group after a separating gap.
    xs_input = _MARGIN
    cols: List[Tuple[int, int, int]] = []  # (run position, epoch, x)
    group_spans: List[Tuple[int, int]] = []
    x = _MARGIN + cw
    rules: List[int] = []
    for pos, r in enumerate(result.runs):
        rules.append(x + _RUN_GAP // 2)
        x += _RUN_GAP
        start = x
        for e in r.epochs:
            cols.append((pos, e, x))
            x += cw + _COL_GAP
        x -= _COL_GAP
        group_spans.append((start, x))
    grid_w = x + _MARGIN

    legend = [f"run {i + 1}: {r.run_id}  name {r.run_name or '-'}  experiment {r.experiment}  "
              f"epochs {_epoch_list(list(r.epochs), 12)} (logged {len(r.logged_epochs)})"
              for i, r in enumerate(result.runs)]
    width = max([grid_w, _text_width(big, title) + 2 * _MARGIN]
                + [_text_width(font, t) + 2 * _MARGIN for t in legend])

    footer: List[Tuple[str, Tuple[int, int, int]]] = []
    text_w = width - 2 * _MARGIN
    if any(result.unmatched.values()):
        footer.append(("unmatched samples (not logged by every run; not shown above):", _WRONG))
        for pos, r in enumerate(result.runs):
            sids = result.unmatched.get(r.run_id, ())
            if not sids or r.run_id in [x.run_id for x in result.runs[:pos]]:
                continue
            words = [f"run {pos + 1} ({_short(r.run_id)}):"] + [
                f"{s} ({result.labels.get(s) or '-'})," for s in sids]
            words[-1] = words[-1].rstrip(",")
            footer += [(ln, _TEXT) for ln in _wrap(font, words, text_w)]
    for note in result.notes:
        footer += [(ln, _MUTED) for ln in _wrap(font, ("note: " + note).split(" "), text_w)]

    header_h = _MARGIN + blh + _COL_GAP + len(legend) * lh + _ROW_GAP
    colhead_h = 2 * lh + _COL_GAP
    row_h = ch + _BAR + _COL_GAP + 2 * lh + _ROW_GAP
    rows = list(result.matched)
    footer_h = (len(footer) * lh + _ROW_GAP) if footer else 0
    height = header_h + colhead_h + len(rows) * row_h + footer_h + _MARGIN

    canvas = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(canvas)
    y = _MARGIN
    draw.text((_MARGIN, y), title, fill=_TEXT, font=big)
    y += blh + _COL_GAP
    for t in legend:
        draw.text((_MARGIN, y), _fit(font, t, text_w), fill=_MUTED, font=font)
        y += lh
    y = header_h
    # Column headers: run group names, then epochs.
    draw.text((xs_input, y + lh), "input", fill=_TEXT, font=font)
    for pos, (a, b) in enumerate(group_spans):
        draw.text((a, y), _fit(font, f"run {pos + 1} ({_short(result.runs[pos].run_id)})", b - a),
                  fill=_TEXT, font=font)
    for _, e, cx in cols:
        draw.text((cx, y + lh), _fit(font, f"epoch {e}", cw), fill=_TEXT, font=font)
    y += colhead_h
    grid_top = y - 2
    draw.line([(0, grid_top), (grid_w - 1, grid_top)], fill=_RULE)

    for i, sid in enumerate(rows):
        top = y + i * row_h
        if i:
            rule_y = top - _ROW_GAP // 2 - 1
            draw.line([(0, rule_y), (grid_w - 1, rule_y)], fill=_RULE)
        _paste(canvas, draw, inputs.get(sid), xs_input, top, cw, ch, "no input")
        ty = top + ch + _BAR + _COL_GAP
        label = result.labels.get(sid)
        draw.text((xs_input, ty), _fit(font, f"true: {label if label is not None else '-'}", cw),
                  fill=_TEXT, font=font)
        draw.text((xs_input, ty + lh), _fit(font, f"id {sid}", cw), fill=_MUTED, font=font)
        for pos, e, cx in cols:
            cell = grid.get((pos, sid, e), _Cell(None, "not logged"))
            _paste(canvas, draw, cell.panel, cx, top, cw, ch, cell.empty_text)
            if cell.empty_text == "not logged":
                continue
            if cell.correct is not None:
                draw.rectangle([(cx, top + ch), (cx + cw - 1, top + ch + _BAR - 1)],
                               fill=_OK if cell.correct else _WRONG)
            text, mark = _caption_pred(cell)
            mark_w = _text_width(font, mark) + _COL_GAP if mark else 0
            text = _fit(font, text, max(0, cw - mark_w))
            draw.text((cx, ty), text, fill=_TEXT, font=font)
            if mark:
                draw.text((cx + _text_width(font, text) + _COL_GAP, ty), mark,
                          fill=_OK if cell.correct else _WRONG, font=font)
            draw.text((cx, ty + lh), _fit(font, _evr_text(cell, component), cw), fill=_MUTED, font=font)
    grid_bottom = header_h + colhead_h + len(rows) * row_h - _ROW_GAP
    for rx in rules:
        draw.line([(rx, header_h), (rx, max(grid_bottom, header_h + colhead_h))], fill=_RULE)

    y = header_h + colhead_h + len(rows) * row_h
    for text, colour in footer:
        draw.text((_MARGIN, y), text, fill=colour, font=font)
        y += lh
    return np.asarray(canvas, dtype=np.uint8).copy()


def _paste(canvas, draw, panel: Optional[np.ndarray], x: int, y: int, cw: int, ch: int,
           empty_text: str) -> None:
    from PIL import Image

    if panel is None:
        draw.rectangle([(x, y), (x + cw - 1, y + ch - 1)], fill=_EMPTY)
        font = _font(_STRIP_FONT_SIZE)
        text = _fit(font, empty_text or "-", cw - 8)
        draw.text((x + (cw - _text_width(font, text)) // 2, y + ch // 2 - 6), text,
                  fill=_MUTED, font=font)
        return
    # Panels of other sizes (mixed image sizes) are centred in the cell, never rescaled.
    ox, oy = (cw - panel.shape[1]) // 2, (ch - panel.shape[0]) // 2
    canvas.paste(Image.fromarray(panel), (x + ox, y + oy))


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:16px;color:#141414}
h1{font-size:18px;margin:0 0 8px}h2{font-size:16px;margin:24px 0 8px}
table.runs{border-collapse:collapse;font-size:13px;margin-bottom:12px}
table.runs td,table.runs th{padding:2px 10px 2px 0;text-align:left;vertical-align:top}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.scroll{overflow:auto;max-width:100%;border:1px solid #ddd}
table.grid{border-collapse:separate;border-spacing:0;font-size:12px}
table.grid th,table.grid td{padding:4px;vertical-align:top;text-align:left;background:#fff}
table.grid thead th{position:sticky;top:0;z-index:1;border-bottom:1px solid #ccc;white-space:nowrap}
table.grid thead tr:nth-child(2) th{top:22px}
table.grid .in{position:sticky;left:0;z-index:2;border-right:1px solid #ccc}
table.grid .first{border-left:2px solid #bbb}
table.grid tbody tr+tr td,table.grid tbody tr+tr th{border-top:1px solid #eee}
table.grid tbody th{font-weight:normal}h3{font-size:14px;margin:12px 0 6px}
img{display:block;image-rendering:pixelated}
.cap{margin-top:2px;line-height:1.35;max-width:var(--w)}
.ok{color:#008200;font-weight:600}.bad{color:#c80000;font-weight:600}
.muted{color:#6e6e6e}.empty{background:#ececec;color:#6e6e6e;display:flex;align-items:center;
justify-content:center}
.bar-ok{border-bottom:3px solid #008200}.bar-bad{border-bottom:3px solid #c80000}
.unmatched figure{display:inline-block;margin:0 12px 12px 0;font-size:12px}
"""


def _img(panel: np.ndarray, alt: str) -> str:
    data = base64.b64encode(encode_png(panel)).decode("ascii")
    h, w = panel.shape[:2]
    return (f'<img src="data:image/png;base64,{data}" width="{w}" height="{h}" '
            f'alt="{html.escape(alt)}">')


def _render_html(result: CompareResult, grid: Dict[Tuple[int, str, int], _Cell],
                 inputs: Dict[str, np.ndarray], title: str, component: int,
                 uri: str) -> str:
    e = html.escape
    panels = [c.panel for c in grid.values() if c.panel is not None]
    cw = max([p.shape[1] for p in panels], default=128)
    ch = max([p.shape[0] for p in panels], default=128)
    out: List[str] = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>", f"<style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        (f'<p class="muted">Tracking URI <code>{e(uri)}</code>. Rows: samples matched across '
         f"runs by sample id (a hash of the image). Columns: the input, then the overlay of "
         f"principal component {component} per run and epoch.</p>"),
        ('<table class="runs"><tr><th></th><th>run id</th><th>name</th><th>experiment</th>'
         "<th>epochs shown</th><th>logged</th></tr>"),
    ]
    for i, r in enumerate(result.runs):
        out.append(f"<tr><td>run {i + 1}</td><td><code>{e(r.run_id)}</code></td>"
                   f"<td>{e(r.run_name or '-')}</td><td>{e(r.experiment)}</td>"
                   f"<td>{e(_epoch_list(list(r.epochs)))}</td><td>{len(r.logged_epochs)}</td></tr>")
    out.append("</table>")

    out.append('<div class="scroll"><table class="grid"><thead><tr>'
               '<th class="in" rowspan="2">input</th>')
    for i, r in enumerate(result.runs):
        out.append(f'<th class="first" colspan="{len(r.epochs)}">run {i + 1} '
                   f'<code>{e(_short(r.run_id))}</code> <span class="muted">{e(r.run_name)} '
                   f"&middot; {e(r.experiment)}</span></th>")
    out.append("</tr><tr>")
    for r in result.runs:
        for j, ep in enumerate(r.epochs):
            cls = ' class="first"' if j == 0 else ""
            out.append(f"<th{cls}>epoch {ep}</th>")
    out.append("</tr></thead><tbody>")
    for sid in result.matched:
        label = result.labels.get(sid)
        out.append(f'<tr id="s-{e(sid)}"><th class="in" style="--w:{cw}px">')
        panel = inputs.get(sid)
        out.append(_img(panel, f"input {sid}") if panel is not None else
                   f'<div class="empty" style="width:{cw}px;height:{ch}px">no input</div>')
        out.append(f'<div class="cap">true: {e(label if label is not None else "-")}<br>'
                   f'<span class="muted">id <code>{e(sid)}</code></span></div></th>')
        for pos, r in enumerate(result.runs):
            for j, ep in enumerate(r.epochs):
                cell = grid.get((pos, sid, ep), _Cell(None, "not logged"))
                cls = ' class="first"' if j == 0 else ""
                out.append(f'<td{cls} style="--w:{cw}px">')
                bar = "" if cell.correct is None else (" bar-ok" if cell.correct else " bar-bad")
                if cell.panel is not None:
                    out.append(f'<div class="{bar.strip()}">'
                               f'{_img(cell.panel, f"run {r.run_id} epoch {ep} sample {sid}")}</div>')
                else:
                    out.append(f'<div class="empty{bar}" style="width:{cw}px;height:{ch}px">'
                               f"{e(cell.empty_text or '-')}</div>")
                if cell.empty_text != "not logged":
                    text, mark = _caption_pred(cell)
                    mark_html = "" if not mark else (
                        f' <span class="{"ok" if cell.correct else "bad"}">'
                        f'{"&#10003;" if cell.correct else "&#10007;"}</span>')
                    out.append(f'<div class="cap">{e(text)}{mark_html}<br>'
                               f'<span class="muted">{e(_evr_text(cell, component))}</span></div>')
                out.append("</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    if not result.matched:
        out.append("<p>No sample was logged by every run.</p>")

    out.append('<h2 id="unmatched">Unmatched samples</h2>')
    if not any(result.unmatched.values()):
        out.append("<p>None: every sample was logged by every run.</p>")
    else:
        out.append('<p class="muted">Logged by some runs but not all, so not in the table above.</p>'
                   '<div class="unmatched">')
        shown = set()
        for i, r in enumerate(result.runs):
            sids = result.unmatched.get(r.run_id, ())
            if not sids or r.run_id in shown:
                continue
            shown.add(r.run_id)
            out.append(f"<h3>run {i + 1} <code>{e(r.run_id)}</code> ({len(sids)})</h3><div>")
            for sid in sids:
                label = result.labels.get(sid)
                panel = inputs.get(sid)
                img = _img(panel, f"input {sid}") if panel is not None else ""
                out.append(f"<figure>{img}<figcaption>id <code>{e(sid)}</code><br>true: "
                           f"{e(label if label is not None else '-')}</figcaption></figure>")
            out.append("</div>")
        out.append("</div>")
    if result.notes:
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in result.notes) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- CLI


def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mlflow-eigencam compare`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "compare",
        help="compare EigenCAM overlays across epochs, runs and experiments",
        description="Rows: samples matched across runs by sample id. Columns: the input, then "
                    "one overlay per (run, epoch). EPOCHS: '0,4,9', '0-9', 'first', 'last', "
                    "'all' (default: all; for a PNG at most --png-max-epochs, evenly spaced).",
    )
    p.add_argument("runs", nargs="*", metavar="RUN_ID[@EPOCHS]", help="runs to compare")
    p.add_argument("--experiment", action="append", default=None, metavar="NAME[@EPOCHS]",
                   help="add the latest run of this experiment that has EigenCAM data (repeatable)")
    p.add_argument("--mode", default="eval", help="mode the samples were logged under (default: eval)")
    p.add_argument("--ds-id", default=None, help="dataset id they were logged under (default: none)")
    p.add_argument("--component", type=int, default=1, help="principal component to show (default: 1)")
    p.add_argument("--epochs", default=None, metavar="EPOCHS",
                   help="EPOCHS for runs given without @EPOCHS")
    p.add_argument("--out", default="compare.png", help="output .png or .html (default: compare.png)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI / MLflow's default)")
    p.add_argument("--png-max-epochs", type=int, default=PNG_MAX_EPOCHS,
                   help=f"epochs per run in a PNG without @EPOCHS (default: {PNG_MAX_EPOCHS})")
    p.set_defaults(func=_cli_compare)
    return p


def _cli_compare(args: argparse.Namespace) -> int:
    if not args.runs and not args.experiment:
        raise ValueError("compare needs at least one RUN_ID or --experiment NAME")
    result = compare(args.runs, experiments=args.experiment, mode=args.mode, ds_id=args.ds_id,
                     component=args.component, out=args.out, tracking_uri=args.tracking_uri,
                     epochs=args.epochs, png_max_epochs=args.png_max_epochs)
    n_cols = len(result.columns)
    print(f"wrote {result.path}: {len(result.matched)} matched sample(s) x {n_cols} column(s) "
          f"from {len(result.runs)} run(s)")
    for i, r in enumerate(result.runs):
        print(f"  run {i + 1}: {r.run_id} ({r.experiment}) epochs {_epoch_list(list(r.epochs), 12)}")
    if any(result.unmatched.values()):
        print("unmatched samples (not logged by every run):")
        for run_id, sids in result.unmatched.items():
            for sid in sids:
                print(f"  {run_id} {sid} label={result.labels.get(sid)!r}")
    for note in result.notes:
        print(f"note: {note}")
    sys.stdout.flush()
    return 0
