"""Compare EigenCAM overlays across epochs, runs and experiments.

Rows are samples, matched across runs by ``sample_id`` (a hash of the image's pixels, so the
same validation image matches whichever run or experiment logged it); columns are the input
image, then one column per (run, epoch) showing the overlay of one principal component.
Everything is read back from what :class:`~mlflow_eigencam.logger.EigenCAMLogger` wrote
(see :mod:`mlflow_eigencam._layout`): the per-(mode, ds_id) table ``samples.json``, the
per-sample card PNGs it points to, and the panel boxes it recorded with each row (``card``).
Nothing is recomputed and no panel position is guessed from pixels.

Output:

* ``.png``: one image for a quick look. Deterministic bytes for equal inputs. When a run
  was given without an epoch selection and logged more than ``png_max_epochs`` epochs,
  that many are shown, evenly spaced, first and last included, and a note says so.
* ``.html`` / ``.htm``: one self-contained page (images as ``data:`` URIs, inline CSS, no
  scripts, no external resources) with every selected epoch, in a scrollable table.
* No ``out``: a PNG in a new temporary file (its path is in the result; the CLI prints it),
  never a file in the working directory.

Samples that are not in every run are not dropped silently: they are returned, printed by
the CLI and listed at the bottom of the PNG and in an "Unmatched samples" section of the page.
A sample that every run logged, but not at every selected epoch (a shuffled evaluation
subset), is a row with a grey "not logged" cell where it is missing.

Epoch selections (``RUN_ID@EPOCHS``, ``--epochs``): see :mod:`mlflow_eigencam._compare_epochs`.
"""

from __future__ import annotations

import argparse
import io
import numbers
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

# Light imports only: the package imports this module eagerly so that
# ``mlflow_eigencam.compare`` is the function, not this module; the renderer (OpenCV,
# Pillow) and MLflow are imported when compare() runs.
from . import _layout
from ._compare_epochs import check_epoch_spec, epoch_list, evenly, parse_epochs, split_at
from ._reader import Reader, card_boxes, cell_bool, cell_text, check_tracking_uri

if TYPE_CHECKING:
    from ._compare_render import Grid

__all__ = ["CompareResult", "RunColumns", "add_compare_parser", "compare", "parse_epochs"]

#: Epochs shown per run in a PNG when the run was given without an epoch selection.
PNG_MAX_EPOCHS = 8

_FORMATS = (".png", ".html", ".htm")


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
        notes: Human-readable notes (epochs left out of a PNG, cards that were missing).
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


@dataclass(frozen=True)
class _Request:
    """``compare``'s arguments, checked (before MLflow is asked anything)."""

    runs: List[Tuple[str, Optional[str]]]  # (run id, EPOCHS or None)
    experiments: List[str]
    mode: str
    ds_id: Optional[str]
    component: int
    out: Path
    fmt: str
    epochs: Optional[str]
    png_max_epochs: int
    sample_ids: Optional[List[str]]


def _check_request(runs: Union[str, Sequence[str]], experiments: Union[str, Sequence[str], None],
                   mode: str, ds_id: Optional[str], component: int,
                   out: Union[str, "os.PathLike[str]", None], epochs: Optional[str],
                   png_max_epochs: int, sample_ids: Optional[Sequence[str]]) -> _Request:
    """Every argument's type and syntax, each error naming the bad value."""
    run_specs = [runs] if isinstance(runs, str) else list(runs or [])
    exp_specs = [experiments] if isinstance(experiments, str) else list(experiments or [])
    if not run_specs and not exp_specs:
        raise ValueError("compare needs at least one run id or experiment name")
    if not isinstance(mode, str) or not mode:
        raise ValueError(f"mode must be a non-empty string such as 'eval', got {mode!r}")
    if isinstance(component, bool) or not isinstance(component, numbers.Integral) or component < 1:
        raise ValueError(f"component must be an int >= 1 (1 = the first principal component), "
                         f"got {component!r}")
    if isinstance(png_max_epochs, bool) or not isinstance(png_max_epochs, numbers.Integral) \
            or png_max_epochs < 1:
        raise ValueError(f"png_max_epochs must be an int >= 1, got {png_max_epochs!r}")
    if out is not None and Path(out).suffix.lower() not in _FORMATS:
        raise ValueError(f"out must end in .png, .html or .htm, got {str(out)!r}")
    parsed_runs = [split_at(str(s)) for s in run_specs]
    for rid, spec in parsed_runs:
        if not rid:
            raise ValueError(f"empty run id in {run_specs!r}")
        if spec is not None:
            check_epoch_spec(spec)
    if epochs is not None:
        check_epoch_spec(epochs)
    out_path = Path(out) if out is not None else _temp_png()
    return _Request(parsed_runs, [str(e) for e in exp_specs], mode, ds_id, int(component),
                    out_path, out_path.suffix.lower(), epochs, int(png_max_epochs),
                    None if sample_ids is None else [str(s) for s in sample_ids])


def _temp_png() -> Path:
    """A new, empty temporary ``.png`` file (no ``out`` given: never the working directory)."""
    fd, name = tempfile.mkstemp(prefix="mlflow-eigencam-compare-", suffix=".png")
    os.close(fd)
    return Path(name)


def _no_data_message(reader: Reader, run, mode: str, ds_id: Optional[str]) -> str:
    rid = run.info.run_id
    have = reader.available(run)
    msg = (f"run {rid} has no EigenCAM data for mode={mode!r}, ds_id={_layout.ds_label(ds_id)!r} "
           f"(no {_layout.table_path(mode, ds_id)})")
    if not have:
        return msg + "; it has no EigenCAM data at all"
    listed = ", ".join(f"mode={m!r} ds_id={d!r}" for m, d in have)
    return msg + f"; it has: {listed}"


def _load_run(reader: Reader, run, spec: Optional[str], req: _Request) -> _Run:
    rid = run.info.run_id
    if not reader.has_table(run, req.mode, req.ds_id):
        raise LookupError(_no_data_message(reader, run, req.mode, req.ds_id))
    table = reader.table(rid, req.mode, req.ds_id)
    if req.component > table.n_evr:
        raise LookupError(f"run {rid} logged {table.n_evr} component(s) for mode={req.mode!r}, "
                          f"ds_id={_layout.ds_label(req.ds_id)!r}; component {req.component} was asked for")
    name = run.data.tags.get("mlflow.runName") or getattr(run.info, "run_name", None) or ""
    return _Run(spec, rid, str(name), reader.experiment_name(run.info.experiment_id), table.rows,
                table.n_evr, table.epochs)


def _select_runs(reader: Reader, req: _Request) -> List[_Run]:
    """The runs given, then each experiment's latest run with data, loaded in that order."""
    selected: List[Tuple[Any, Optional[str]]] = [(reader.run(rid), spec) for rid, spec in req.runs]
    for text in req.experiments:
        name, spec = text, None
        if reader.client.get_experiment_by_name(name) is None and "@" in name:
            name, spec = split_at(name)
            check_epoch_spec(spec or "")
        selected.append((reader.latest_run_with_data(name, req.mode, req.ds_id), spec))
    return [_load_run(reader, run, spec, req) for run, spec in selected]


def _pick_epochs(loaded: List[_Run], req: _Request, notes: List[str]) -> None:
    """Each run's epochs to show, and its rows by sample and epoch."""
    for r in loaded:
        spec = r.spec_epochs if r.spec_epochs is not None else req.epochs
        r.epochs = parse_epochs(spec, r.logged,
                                what=f"run {r.run_id} (mode={req.mode!r}, ds_id={_layout.ds_label(req.ds_id)!r})")
        if spec is None and req.fmt == ".png" and len(r.epochs) > req.png_max_epochs:
            r.epochs = evenly(r.epochs, req.png_max_epochs)
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


def _match(loaded: List[_Run], only: Optional[List[str]]
           ) -> Tuple[List[str], Dict[str, List[str]], Dict[str, Optional[str]]]:
    """(matched sample ids in row order, {run_id: unmatched ids}, {sample_id: label})."""
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
                labels[sid] = cell_text(first.get("label"))
    return matched, unmatched, labels


# --------------------------------------------------------------------------- the feature


def compare(
    runs: Union[str, Sequence[str]] = (),
    *,
    experiments: Union[str, Sequence[str], None] = None,
    mode: str = "eval",
    ds_id: Optional[str] = None,
    component: int = 1,
    out: Union[str, "os.PathLike[str]", None] = None,
    tracking_uri: Optional[str] = None,
    epochs: Optional[str] = None,
    png_max_epochs: int = PNG_MAX_EPOCHS,
    sample_ids: Optional[Sequence[str]] = None,
    reader: Optional[Reader] = None,
) -> CompareResult:
    """Write a side-by-side comparison of EigenCAM overlays across epochs, runs and experiments.

    Args:
        runs: Run ids (or a unique prefix of 4+ characters, as the CLI prints them), each
            optionally ``"RUN_ID@EPOCHS"`` (see the module docstring).
        experiments: Experiment names, each optionally ``"NAME@EPOCHS"``: the latest active
            run of each that has EigenCAM data for (mode, ds_id) joins the comparison.
        mode: The mode the samples were logged under ("eval", "test", ...).
        ds_id: The dataset id they were logged under (None or ``"all"``: logged without one).
        component: Which principal component's overlay to show, 1-based.
        out: Output file; ``.png`` or ``.html`` / ``.htm`` picks the format. Parent folders
            are created. None: a PNG in a new temporary file (``result.path``).
        tracking_uri: Where the runs live; default ``mlflow.get_tracking_uri()`` (which
            honours ``MLFLOW_TRACKING_URI``).
        epochs: EPOCHS for runs given without ``@EPOCHS`` (default: all; for a PNG at most
            ``png_max_epochs`` of them, evenly spaced).
        png_max_epochs: See ``epochs``.
        sample_ids: Only these matched samples, in this order (the explorer's filtered
            rows); None: every matched sample.
        reader: Read through this reader instead of one for ``tracking_uri`` (the explorer's
            own: inside ``mlflow server`` it reads the server's stores, which have no URI).

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
    req = _check_request(runs, experiments, mode, ds_id, component, out, epochs,
                         png_max_epochs, sample_ids)
    try:
        return _compare(req, tracking_uri, reader)
    except BaseException:
        if out is None:  # the temporary file we made, empty
            req.out.unlink(missing_ok=True)
        raise


def _compare(req: _Request, tracking_uri: Optional[str], reader: Optional[Reader]) -> CompareResult:
    import mlflow

    from ._compare_render import render_html, render_png
    from .render import encode_png
    from ._transport import probe

    if reader is None:
        uri = check_tracking_uri(str(tracking_uri or mlflow.get_tracking_uri()))
        if not probe(uri):
            raise ConnectionError(f"cannot reach MLflow at {uri}")
        reader = Reader(uri)
    loaded = _select_runs(reader, req)
    notes: List[str] = []
    _pick_epochs(loaded, req, notes)
    matched, unmatched, labels = _match(loaded, req.sample_ids)
    cards = _fetch_cards(reader, loaded, set(matched), req.mode, req.ds_id)
    grid, inputs = _cells(loaded, matched, cards, req.component, notes)

    req.out.parent.mkdir(parents=True, exist_ok=True)
    result_runs = tuple(RunColumns(r.run_id, r.run_name, r.experiment, tuple(r.epochs),
                                   tuple(r.logged)) for r in loaded)
    result = CompareResult(req.out, result_runs, tuple(matched),
                           {k: tuple(v) for k, v in unmatched.items()}, labels, tuple(notes))
    title = f"EigenCAM PC{req.component} | mode {req.mode} | ds_id {_layout.ds_label(req.ds_id)}"
    if req.fmt == ".png":
        req.out.write_bytes(encode_png(render_png(result, grid, inputs, title, req.component)))
    else:
        req.out.write_text(render_html(result, grid, inputs, title, req.component, reader.uri),
                           encoding="utf-8")
    return result


def _first_seen(loaded: List[_Run]) -> List[str]:
    seen: List[str] = []
    done = set()
    for r in loaded:
        for sid in r.order:
            if sid not in done:
                done.add(sid)
                seen.append(sid)
    return seen


_CardKey = Tuple[str, int, int]  # run id, epoch, sample_index


def _fetch_cards(reader: Reader, loaded: List[_Run], wanted: set, mode: str,
                 ds_id: Optional[str]) -> Dict[_CardKey, Optional[np.ndarray]]:
    """{(run_id, epoch, sample_index): card pixels or None (missing)} for every cell to draw.

    ``wanted``: the matched sample ids (every selected epoch); of the others only the first
    selected epoch is fetched, for the input image shown in the unmatched list.
    """
    from PIL import Image

    jobs: Dict[_CardKey, dict] = {}  # ordered
    for r in loaded:
        for sid in r.order:
            # Every cell of a matched sample; one card (for its input image) of the others.
            epochs = r.epochs if sid in wanted else [min(r.by_sample[sid])]
            for e in epochs:
                row = r.by_sample[sid].get(e)
                if row is not None:
                    jobs[_card_key(r.run_id, row)] = row

    def load(key: _CardKey) -> Optional[np.ndarray]:
        data = reader.card(key[0], mode, ds_id, jobs[key])
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


def _card_key(run_id: str, row: dict) -> _CardKey:
    return run_id, int(row["epoch"]), int(row.get("sample_index", -1))


def _panels(card: Optional[np.ndarray], row: dict) -> List[np.ndarray]:
    """The card's panels (input first) at the boxes recorded with its row; [] when the card
    is missing or its size is not the recorded one."""
    found = card_boxes(row)
    if card is None or found is None or list(card.shape[:2]) != found[0]:
        return []
    return [card[y:y + h, x:x + w].copy() for x, y, w, h in found[1]]


def _cells(loaded: List[_Run], matched: List[str], cards: Dict[_CardKey, Optional[np.ndarray]],
           component: int, notes: List[str]) -> Tuple[Grid, Dict[str, np.ndarray]]:
    """Crop the panels: {(run position, sample_id, epoch): cell}, {sample_id: input panel}.

    Cells for matched samples only; input panels for every sample that has a card (the
    unmatched list shows them too).
    """
    from ._compare_render import Cell

    grid: Grid = {}
    inputs: Dict[str, np.ndarray] = {}
    missing = 0
    wanted = set(matched)
    for pos, r in enumerate(loaded):
        for sid in r.order:
            full = sid in wanted
            for e in (r.epochs if full else [min(r.by_sample[sid])]):
                row = r.by_sample[sid].get(e)
                if row is None:
                    grid[(pos, sid, e)] = Cell(None, "not logged")
                    continue
                panels = _panels(cards.get(_card_key(r.run_id, row)), row)
                if panels and sid not in inputs:
                    inputs[sid] = panels[0]
                if not full:
                    continue
                evr = row.get(f"evr_{component}")
                cell = Cell(None, "", cell_text(row.get("prediction")), cell_bool(row.get("correct")),
                            None if evr is None else float(evr))
                if not panels and not row.get(_layout.TABLE_IMAGE_COLUMN):
                    cell.empty_text = "not rendered"  # streamed, and no renderer here
                elif not panels:
                    missing += 1
                    cell.empty_text = "card missing"
                elif component >= len(panels):
                    cell.empty_text = f"no PC{component}"
                else:
                    cell.panel = panels[component]
                grid[(pos, sid, e)] = cell
    if missing:
        notes.append(f"{missing} card(s) listed in the tables could not be downloaded or read "
                     "(shown as 'card missing')")
    return grid, inputs


# --------------------------------------------------------------------------- CLI


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
    p.add_argument("--out", default=None,
                   help="output .png or .html (default: a new temporary .png, its path printed)")
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
        print(f"  run {i + 1}: {r.run_id} ({r.experiment}) epochs {epoch_list(list(r.epochs), 12)}")
    if any(result.unmatched.values()):
        print("unmatched samples (not logged by every run):")
        for run_id, sids in result.unmatched.items():
            for sid in sids:
                print(f"  {run_id} {sid} label={result.labels.get(sid)!r}")
    for note in result.notes:
        print(f"note: {note}")
    sys.stdout.flush()
    return 0
